"""The embedded demo: what lets every stage run on a CPU with no download.

- models/tiny.py: a tiny random-init Qwen2.5-VL with a locally built tokenizer and
  processor (`policy.model: tiny-qwen2.5-vl`);
- models/tiny_clip.py: a toy CLIP trained on the synthetic shapes (`tiny-clip`, the
  clip_score reward's default);
- data/synth.py: the synthetic shapes dataset (`pebr data synth`, a schedule's `synth`);
- rewards/scene.py: the `scene` reward, which checks a description against the truth
  the synthetic data carries;
- evaluation/perception.py: the perception metrics and the accuracy decomposition
  that every greedy evaluation reports for such data;
- testing/: helpers for this repository's tests (fault injectors, process runners).

It plugs into pebr_lightning through entry points (pyproject.toml), as a user's own
package would; pebr_lightning imports none of it (tests/test_layers.py).
"""
