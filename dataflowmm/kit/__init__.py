"""The kit: what dataflowmm's tests, benchmarks, demo and scaffolds stand on, outside the core.

- `shapes`: the shapes world, a deterministic toy dataset whose images can be judged from
  pixels (`judge_image`);
- `shapes_recipes`, `shapes_training`, `train_shapes_clip`, `train_shapes_captioner`,
  `train_shapes_sd`: the toy models trained on it (`trained:shapes-clip`, ...), and
  `trained_models`, what the model registry (`dataflowmm.models.tiny`) asks of them;
- `difference_pairs`: image pairs with known changes, for the difference pipeline;
- `loopback_images_api`: a loopback OpenAI-compatible images API that misbehaves on request;
- `loopback_chat_api`: a loopback OpenAI-compatible chat API that answers questions about
  shapes-world images from their pixels, and misbehaves on request (both on `loopback_server`).

The kit may import the core; the core never imports the kit (tests/test_import_layers.py).
"""
