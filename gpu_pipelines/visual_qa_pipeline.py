"""Visual QA: images with questions in; answers, then LLaVA-style question-answer conversations out.

    python visual_qa_pipeline.py --tiny      # offline: a loopback chat server started here, shapes-world images
    vllm serve Qwen/Qwen2.5-VL-7B-Instruct   # (another shell, a GPU box) any OpenAI-compatible server
    python visual_qa_pipeline.py --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct
    python visual_qa_pipeline.py --local-model llava-hf/llava-1.5-7b-hf   # in this process (transformers)

Step 1 (PromptedVQAGenerator) answers each row's `question` about its `images`; step 2
(ImageQAGenerator) has the model propose `--num-questions` questions per image and answer
them, as `conversations` in LLaVA / ShareGPT turns, exported as LLaVA training JSON
(`llava/conversations.json`, images beside it: give `llava/` to LLaVA's `--image_folder`). Requests run `--max-concurrency` at a
time; a failed request fails its row only, and the next run retries rows that failed for a
reason that may pass (rate limit, server error, time-out).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from dataflowmm import FileStorage
from dataflowmm.console import run_script
from dataflowmm.execution.options import add_runner_arguments, runner_from_args
from dataflowmm.operators import ImageQAGenerator, PromptedVQAGenerator

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE.parent / "example_data" / "visual_qa" / "questions.jsonl"
DEFAULT_CACHE = HERE.parent / "cache_local" / "visual_qa"  # beside example_data, wherever you run from


class VisualQAPipeline:
    def __init__(
        self,
        serving,
        runner=None,
        input_file: str | Path = DEFAULT_INPUT,
        cache_path: str | Path = DEFAULT_CACHE,
        num_questions: int = 3,
        save_interval: int = 256,
        seed: int = 0,
    ):
        self.cache_path = Path(cache_path)
        self.storage = FileStorage(
            first_entry_file_name=input_file,
            cache_path=cache_path,
            file_name_prefix="dataflow_cache_step",
            cache_type="jsonl",
            runner=runner,
        )
        self.answerer = PromptedVQAGenerator(serving, save_interval=save_interval, seed=seed)
        self.qa_writer = ImageQAGenerator(serving, num_questions=num_questions, save_interval=save_interval, seed=seed)

    retry_errors = False  # --retry-errors: recompute every failed row of finished steps

    def forward(self):
        return [
            self.answerer.run(self.storage.step(), input_prompt_key="question", input_image_key="images",
                              output_answer_key="answer", retry_errors=self.retry_errors),
            self.qa_writer.run(self.storage.step(), input_image_key="images",
                               output_conversation_key="conversations", retry_errors=self.retry_errors),
        ]

    def publish(self, summaries) -> dict[str, Path]:
        """The conversations as LLaVA training JSON (rows that failed left out and counted)."""
        from dataflowmm.export import export_step

        report = export_step(summaries[-1].output_path, "llava", self.cache_path / "llava" / "conversations.json",
                             conversation_column="conversations")
        print(report.summary())
        return {"llava": report.path}


@contextlib.contextmanager
def vlm_serving(args: argparse.Namespace) -> Iterator:
    """The serving the options ask for; with --tiny, a loopback chat server runs meanwhile."""
    if args.local_model:
        from dataflowmm.serving import LocalVLMServing

        yield LocalVLMServing(args.local_model, max_new_tokens=args.max_tokens, batch_size=args.batch_size or 8)
        return
    from dataflowmm.serving import APIVLMServing

    options = {"max_tokens": args.max_tokens, "max_concurrency": args.max_concurrency,
               "max_image_side": args.max_image_side, "batch_size": args.batch_size or 256}
    if not args.tiny:
        key = os.environ.get(args.api_key_env) or "none"  # self-hosted servers often take no key
        yield APIVLMServing(args.model, base_url=args.base_url, api_key=key, **options)
        return
    from dataflowmm.kit.loopback_chat_api import LoopbackChatAPI

    with LoopbackChatAPI() as server:  # answers from the pixels of shapes-world images
        yield APIVLMServing("loopback-vlm", base_url=server.base_url, api_key=server.api_key, **options)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="offline: start a loopback chat server that judges shapes-world images")
    parser.add_argument("--base-url", default=None,
                        help="API root of an OpenAI-compatible server, e.g. http://localhost:8000/v1 (vllm serve)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="the model name the server serves")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the server's key (unset: none sent)")
    parser.add_argument("--local-model", default=None,
                        help="run this chat VLM in this process instead (hub id or folder, e.g. tiny:tiny-chat-vlm)")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="jsonl with `images` and `question` per row")
    parser.add_argument("--cache-path", default=str(DEFAULT_CACHE))
    parser.add_argument("--num-questions", type=int, default=3, help="question-answer pairs per image (step 2)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--max-image-side", type=int, default=None, help="downscale larger images before sending")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per step batch (prompts per serving call; default: the serving's, 256 for a server, 8 local)")
    parser.add_argument("--save-interval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    add_runner_arguments(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="recompute every failed row of finished steps (transient failures are always retried)")
    args = parser.parse_args(argv)
    if not (args.tiny or args.base_url or args.local_model):
        parser.error("give --tiny (offline), --base-url URL --model NAME (a server), or --local-model NAME")
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    with vlm_serving(args) as serving:
        pipeline = VisualQAPipeline(
            serving,
            runner=runner_from_args(args),
            input_file=args.input,
            cache_path=args.cache_path,
            num_questions=args.num_questions,
            save_interval=args.save_interval,
            seed=args.seed,
        )
        pipeline.retry_errors = args.retry_errors
        summaries = pipeline.forward()
    pipeline.publish(summaries)
    return summaries


if __name__ == "__main__":
    run_script(main)  # a mistake prints one line; --debug shows the traceback
