"""The CLIP reward and the embedded tiny CLIP it scores with by default.

The first test that needs the tiny CLIP trains it into the session's cache folder
(~50-60 s on one CPU thread); every other test reuses it.
"""

from __future__ import annotations

import os
import pickle
import random
import time
from pathlib import Path

import pytest
import torch

from pebr_demo.data.synth import synth_records
from pebr_demo.models import tiny_clip
from pebr_demo.models.tiny_clip import TINY_CLIP, ensure_tiny_clip, perturb_description
from pebr_lightning.data.prompts import render_response
from pebr_lightning.errors import PebrError
from pebr_lightning.rewards import clip_score
from pebr_lightning.rewards.clip_score import ClipScoreReward, clip_reward
from pebr_lightning.rewards.protocol import RewardOutput


@pytest.fixture(scope="module")
def clip_dir() -> Path:
    return ensure_tiny_clip()


@pytest.fixture(scope="module")
def reward(clip_dir: Path) -> ClipScoreReward:
    """One loaded reward shared by the tests that only read scores."""
    return ClipScoreReward()


@pytest.fixture(scope="module")
def held_out() -> list[tuple[dict, object]]:
    return list(synth_records(200, seed=1))


def response(description: str) -> str:
    return render_response("3", description, "count them", ["there are 3"])


# --- the reward formula -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("similarity", "scale", "expected"),
    [
        (0.2, 0.4, 0.5),  # 0.2 / 0.4
        (0.1, 0.4, 0.25),
        (0.4, 0.4, 1.0),  # exactly the scale: 1
        (0.6, 0.4, 1.0),  # min(1, 1.5)
        (0.0, 0.4, 0.0),
        (-0.3, 0.4, 0.0),  # negative similarity clamps to 0
        (0.1, 0.2, 0.5),  # another scale: 0.1 / 0.2
        (1.0, 2.0, 0.5),
    ],
)
def test_clip_reward_formula(similarity: float, scale: float, expected: float) -> None:
    assert clip_reward(similarity, scale) == pytest.approx(expected)


def test_scores_follow_the_formula_from_the_logged_similarity(reward, held_out) -> None:
    records = held_out[:6]
    out = reward(
        completions=[response(r["description"]) for r, _ in records],
        samples=[r for r, _ in records],
        images=[image for _, image in records],
    )
    assert isinstance(out, RewardOutput)
    assert list(out.components) == ["similarity"]
    sims = out.components["similarity"]
    assert len(out.scores) == len(sims) == 6
    assert out.scores == [pytest.approx(min(1.0, max(0.0, s / 0.4))) for s in sims]
    halved = ClipScoreReward(scale=0.2)(
        completions=[response(r["description"]) for r, _ in records],
        samples=[r for r, _ in records],
        images=[image for _, image in records],
    )
    assert halved.scores == [pytest.approx(min(1.0, max(0.0, s / 0.2))) for s in sims]


# --- the embedded tiny CLIP --------------------------------------------------------------


def test_tiny_clip_is_built_once_into_the_cache(clip_dir: Path) -> None:
    assert clip_dir == tiny_clip.cache_dir() / f"{TINY_CLIP}-r{tiny_clip.RECIPE_VERSION}"
    assert (clip_dir / tiny_clip.CONFIG_FILE).is_file()
    assert (clip_dir / tiny_clip.WEIGHTS_FILE).is_file()
    # No scratch folder is left behind next to it.
    assert [p.name for p in clip_dir.parent.glob(f".{TINY_CLIP}-*")] == []
    weights_mtime = (clip_dir / tiny_clip.WEIGHTS_FILE).stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_tiny_clip() == clip_dir
    assert time.perf_counter() - started < 1.0  # reused, not retrained
    assert (clip_dir / tiny_clip.WEIGHTS_FILE).stat().st_mtime_ns == weights_mtime


def test_tiny_clip_loads_through_open_clip_local_dir(clip_dir: Path) -> None:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < params < 5_000_000  # ~3.4 M, most of it the 49,408-row token table
    assert tokenizer(["a red circle"]).shape == (1, 77)
    _, image = next(synth_records(1, seed=1))
    assert preprocess(image).shape == (3, 112, 112)
    # Trained, not random init: the stored logit scale is the recipe's fixed 50.
    assert model.logit_scale.exp().item() == pytest.approx(50.0, rel=1e-4)


def test_prefix_text_encoding_equals_open_clip_encode_text() -> None:
    """Training encodes only the non-padding prefix; with a causal mask that is exact."""
    import open_clip

    config = tiny_clip.open_clip_config(tiny_clip.TinyClipRecipe())
    torch.manual_seed(0)
    model = open_clip.CLIP(**config["model_cfg"]).eval()
    texts = ["2 shapes, left to right: a red circle, a blue square.", ""]
    tokens = open_clip.SimpleTokenizer()(texts)
    with torch.no_grad():
        full = model.encode_text(tokens)
        prefix = tiny_clip.encode_text_prefix(model, tokens)
        used = torch.unique(tokens)
        remap = torch.zeros(model.vocab_size, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        compact = model.token_embedding.weight[used]
        remapped = tiny_clip.encode_text_prefix(model, tokens, (compact, remap))
    assert torch.allclose(prefix, full, atol=1e-5)
    assert torch.allclose(remapped, full, atol=1e-5)


def test_hard_negatives_always_differ_from_the_description() -> None:
    rng = random.Random(0)
    changed = 0
    for record, _ in synth_records(300, seed=2):
        for _ in range(4):
            wrong = perturb_description(record["shapes"], rng)
            assert wrong != record["description"], record["shapes"]
            changed += 1
    assert changed == 1200


def test_matching_description_outscores_another_images_description(reward, held_out) -> None:
    """Held-out (seed 1, 200 images): the right description vs the next image's.

    Measured (2026-11-24): mean score 0.77 for matches, 0.12 for mismatches (similarity
    0.31 vs -0.10); 98% of pairs ranked right.
    """
    records = [r for r, _ in held_out]
    images = [image for _, image in held_out]
    matched = reward(
        completions=[response(r["description"]) for r in records], samples=records, images=images
    )
    others = records[1:] + records[:1]
    mismatched = reward(
        completions=[response(r["description"]) for r in others], samples=records, images=images
    )
    right = sum(m > o for m, o in zip(matched.scores, mismatched.scores, strict=True))
    mean_match = sum(matched.scores) / len(records)
    mean_other = sum(mismatched.scores) / len(records)
    assert mean_match - mean_other > 0.4, (mean_match, mean_other)
    assert right / len(records) >= 0.9
    # Scores are not saturated at 1: the calibration keeps matches below the 0.4 scale.
    assert max(matched.scores) < 1.0


def test_correct_description_outscores_one_with_a_mistake(reward, held_out) -> None:
    """Same image, one thing wrong (colour, kind, count or order): what a GRPO group compares.

    Measured (2026-11-24): mean score 0.77 vs 0.57; 73.5% ranked right (78.5% with an
    earlier draw of the training negatives). By kind of mistake (400 images): colour 99%,
    a shape dropped 88% or added 91%, shape kind 66%, two shapes swapped 51% (chance:
    word order is CLIP's known blind spot).
    """
    rng = random.Random(1)
    records = [r for r, _ in held_out]
    images = [image for _, image in held_out]
    good = reward(
        completions=[response(r["description"]) for r in records], samples=records, images=images
    )
    wrong = reward(
        completions=[response(perturb_description(r["shapes"], rng)) for r in records],
        samples=records,
        images=images,
    )
    right = sum(g > w for g, w in zip(good.scores, wrong.scores, strict=True)) / len(records)
    assert sum(good.scores) / len(records) - sum(wrong.scores) / len(records) > 0.1
    assert right >= 0.65


# --- behaviour of the reward --------------------------------------------------------------


def test_missing_description_section_scores_the_empty_caption(reward, held_out) -> None:
    record, image = held_out[0]
    completions = [
        "I think the answer is 3.",  # no sections at all
        "### Image Description:\n### Rationales: none\n### The final answer is: 3",  # empty
        "",
        response(record["description"]),
    ]
    out = reward(completions=completions, samples=[record] * 4, images=[image] * 4)
    sims = out.components["similarity"]
    direct = reward._scorer.encode_texts([""]) @ reward._scorer.encode_images([image]).T
    assert sims[0] == pytest.approx(direct.item(), abs=1e-5)
    assert sims[0] == pytest.approx(sims[1], abs=1e-6) == pytest.approx(sims[2], abs=1e-6)
    assert sims[3] > sims[0] + 0.1  # the real description is not the empty caption
    assert out.scores[0] == 0.0  # the tiny CLIP is trained so that saying nothing scores 0


def test_saying_nothing_scores_zero_on_held_out_images(reward, held_out) -> None:
    """Measured (2026-11-24): empty-caption similarity -0.25 on average, at most -0.09."""
    records = [r for r, _ in held_out]
    out = reward(
        completions=["no description"] * len(records),
        samples=records,
        images=[image for _, image in held_out],
    )
    assert max(out.scores) == 0.0


def test_only_the_description_section_is_scored(reward, held_out) -> None:
    record, image = held_out[0]
    plain = response(record["description"])
    noisy = plain.replace("count them", "a green triangle, a yellow square, 5 shapes")
    out = reward(completions=[plain, noisy], samples=[record] * 2, images=[image] * 2)
    assert out.components["similarity"][0] == pytest.approx(out.components["similarity"][1])


def count_encoded_images(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the open_clip scorer so that each image it encodes is counted."""
    counts: list[int] = []
    original = clip_score._OpenClipScorer.encode_images

    def counting(self, images):
        counts.append(len(images))
        return original(self, images)

    monkeypatch.setattr(clip_score._OpenClipScorer, "encode_images", counting)
    return counts


def test_each_distinct_image_is_encoded_once(monkeypatch, reward, held_out) -> None:
    """3 images x G=4 completions: 3 images encoded; keyed by path, else by object."""
    counts = count_encoded_images(monkeypatch)
    group = 4
    samples = [dict(r) for r, _ in held_out[:3] for _ in range(group)]
    # Distinct PIL objects per completion, as a collator may give: the path decides.
    images = [image.copy() for _, image in held_out[:3] for _ in range(group)]
    completions = [response(s["description"]) for s in samples]
    grouped = reward(completions=completions, samples=samples, images=images)
    assert sum(counts) == 3

    counts.clear()
    unique = [{**s, "image": f"{s['image']}#{i}"} for i, s in enumerate(samples)]
    separate = reward(completions=completions, samples=unique, images=images)
    assert sum(counts) == 12
    assert grouped.scores == pytest.approx(separate.scores, abs=1e-5)

    counts.clear()  # no paths: the same PIL object is the same image
    shared = [image for _, image in held_out[:3] for _ in range(group)]
    no_paths = [{"answer": "3"} for _ in samples]
    by_object = reward(completions=completions, samples=no_paths, images=shared)
    assert sum(counts) == 3
    assert by_object.scores == pytest.approx(grouped.scores, abs=1e-5)


def test_batch_size_splits_encoding_without_changing_scores(monkeypatch, clip_dir, held_out):
    counts = count_encoded_images(monkeypatch)
    records = [r for r, _ in held_out[:10]]
    images = [image for _, image in held_out[:10]]
    completions = [response(r["description"]) for r in records]
    small = ClipScoreReward(batch_size=4)(completions=completions, samples=records, images=images)
    assert counts == [4, 4, 2]
    big = ClipScoreReward(batch_size=32)(completions=completions, samples=records, images=images)
    assert small.scores == pytest.approx(big.scores, abs=1e-5)


def test_loads_lazily_and_pickles_without_the_model(clip_dir, held_out) -> None:
    fresh = ClipScoreReward(batch_size=8)
    assert fresh._scorer is None  # nothing loaded by __init__
    before = pickle.loads(pickle.dumps(fresh))
    assert before._scorer is None and before.batch_size == 8

    records = [r for r, _ in held_out[:4]]
    images = [image for _, image in held_out[:4]]
    completions = [response(r["description"]) for r in records]
    first = fresh(completions=completions, samples=records, images=images, device="cpu")
    assert fresh._scorer is not None
    assert next(fresh._scorer.model.parameters()).device == torch.device("cpu")
    assert not fresh._scorer.model.training

    blob = pickle.dumps(fresh)
    assert len(blob) < 2_000  # settings only, not 13 MB of weights
    after = pickle.loads(blob)
    assert after._scorer is None and fresh._scorer is not None  # the original keeps its model
    for copy in (before, after):
        again = copy(completions=completions, samples=records, images=images)
        assert again.scores == pytest.approx(first.scores, abs=1e-6)


def test_images_are_read_from_sample_paths_without_context_images(tmp_path, reward) -> None:
    from pebr_demo.data.synth import write_dataset
    from pebr_lightning.data.manifest import load_manifest

    samples = load_manifest(write_dataset(tmp_path, n=3, seed=1)).records
    completions = [response(s["description"]) for s in samples]
    from_paths = reward(completions=completions, samples=samples)
    images = [image for _, image in synth_records(3, seed=1)]
    given = reward(completions=completions, samples=samples, images=images)
    assert from_paths.scores == pytest.approx(given.scores, abs=1e-5)


def test_follows_the_reward_contract(clip_dir) -> None:
    from pebr_lightning.rewards.checks import check_reward, make_context, make_samples

    samples = make_samples(3, seed=1)
    report = check_reward(ClipScoreReward(), samples, context=make_context(samples, "unused"))
    assert report.ok


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="backend"):
        ClipScoreReward(backend="clip")
    with pytest.raises(ValueError, match="scale"):
        ClipScoreReward(scale=0)
    with pytest.raises(ValueError, match="batch_size"):
        ClipScoreReward(batch_size=0)
    with pytest.raises(ValueError, match="pretrained"):
        ClipScoreReward(pretrained="openai")  # tiny-clip has its own weights


def test_open_clip_errors_name_the_model(monkeypatch, held_out) -> None:
    reward = ClipScoreReward(model="ViT-B-32", pretrained=os.fspath("/nonexistent/ckpt.pt"))
    record, image = held_out[0]
    with pytest.raises(PebrError, match=r"ViT-B-32.*/nonexistent/ckpt\.pt"):
        reward(completions=["x"], samples=[record], images=[image])


# --- FG-CLIP ------------------------------------------------------------------------------


def test_fgclip_needs_trust_remote_code() -> None:
    with pytest.raises(PebrError, match="trust_remote_code: true") as err:
        ClipScoreReward(backend="fgclip")
    assert "qihoo360/fg-clip-large" in str(err.value)  # names what would run
    with pytest.raises(PebrError, match="trust_remote_code"):
        ClipScoreReward(backend="fgclip", model="/models/fg-clip-base", trust_remote_code=False)
    assert ClipScoreReward(backend="fgclip", trust_remote_code=True)._scorer is None


def test_fgclip_from_a_folder_that_is_not_there_says_so(held_out, tmp_path) -> None:
    """A local FG-CLIP folder that is missing: the real transformers loader would
    answer with its advice on the form of hub ids."""
    missing = tmp_path / "fg-clip-base"
    reward = ClipScoreReward(backend="fgclip", model=str(missing), trust_remote_code=True)
    record, image = held_out[0]
    with pytest.raises(PebrError) as info:
        reward(completions=["x"], samples=[record], images=[image])
    assert str(info.value) == f"clip_score: fgclip model folder {missing} does not exist"


class FakeFgClip(torch.nn.Module):
    """Stands in for a loaded FG-CLIP: records the feature calls, returns fixed features.

    Image features are [1, 0, 0] for every image; text features are [1, 1, 0] when
    the caption starts with "red" and [0, 0, 1] otherwise. So s = 1/sqrt(2) or 0.
    """

    def __init__(self, red_id: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.red_id = red_id
        self.image_calls: list[tuple[int, ...]] = []
        self.text_calls: list[tuple[tuple[int, ...], bool]] = []

    def get_image_features(self, pixel_values):
        self.image_calls.append(tuple(pixel_values.shape))
        return torch.tensor([[1.0, 0.0, 0.0]]).repeat(pixel_values.shape[0], 1)

    def get_text_features(self, input_ids, walk_short_pos=True):
        self.text_calls.append((tuple(input_ids.shape), walk_short_pos))
        red = (input_ids[:, 0] == self.red_id).float()[:, None]
        return torch.cat([red, red, 1 - red], dim=1)


def test_fgclip_plumbing_with_a_fake_model(monkeypatch, held_out) -> None:
    """FG-CLIP cannot be downloaded here: a fake module stands in for the loaded model.

    Checked with it: only the call shapes and arguments of the FG-CLIP path (loader
    arguments, 336x336 pixels, 248-token padded ids, walk_short_pos=False, one image
    encode per distinct image) and the score arithmetic. Real FG-CLIP weights are not run.
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2, "blue": 3, "circle": 4}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]"
    )
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    fake = FakeFgClip(red_id=vocab["red"])
    loaded: list[tuple[str, str, dict]] = []

    def patch_loader(auto_class, kind, obj):
        def from_pretrained(path, **kwargs):
            loaded.append((kind, path, kwargs))
            return obj

        monkeypatch.setattr(auto_class, "from_pretrained", from_pretrained)

    patch_loader(transformers.AutoModelForCausalLM, "model", fake)
    patch_loader(transformers.AutoTokenizer, "tokenizer", tokenizer)
    patch_loader(transformers.AutoImageProcessor, "processor", processor)

    reward = ClipScoreReward(backend="fgclip", model="some/fg-clip", trust_remote_code=True)
    reward.scale = 1.0
    (rec_a, img_a), (rec_b, img_b) = held_out[:2]
    completions = [
        "### Image Description: red circle\n### Rationales: x",
        "### Image Description: blue circle\n### Rationales: x",
        "### Image Description: red circle\n### Rationales: x",
        "no description section",
    ]
    out = reward(
        completions=completions,
        samples=[rec_a, rec_a, rec_b, rec_b],
        images=[img_a, img_a, img_b, img_b],
    )
    assert sorted(kind for kind, _, _ in loaded) == ["model", "processor", "tokenizer"]
    assert all(path == "some/fg-clip" and kw["trust_remote_code"] for _, path, kw in loaded)
    assert fake.image_calls == [(2, 3, 336, 336)]  # two distinct images, resized to 336
    assert fake.text_calls == [((4, 248), False)]  # long-text path
    half = 2**-0.5
    assert out.components["similarity"] == pytest.approx([half, 0.0, half, 0.0])
    assert out.scores == pytest.approx([half, 0.0, half, 0.0])
