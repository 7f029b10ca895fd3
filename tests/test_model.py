"""The PyTorch reference CoAtNet: sizes, shapes, attention maths and configuration errors."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import (
    TIMM_VARIANTS,
    VARIANTS,
    CoAtNet,
    ConfigError,
    Numerics,
    RelativeAttention,
    Tandem,
    UnknownVariantError,
    VariantSpec,
    build_variant,
    count_macs,
    count_parameters,
    get_variant,
    init_weights,
    materialize,
    variant_cost,
    variant_names,
)
from models.coatnet import relative_index

from conftest import TINY

SMALL = dict(
    in_channels=3,
    num_blocks=[1, 1, 2, 2, 1],
    channels=[8, 12, 16, 24, 32],
    num_classes=7,
    num_heads=2,
)


def seeded(model: CoAtNet, seed: int = 0) -> CoAtNet:
    return init_weights(model, seed).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_equals_lucid_without_allocating(name: str) -> None:
    model = build_variant(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == VARIANTS[name].lucid_parameters


def test_registry_lists_both_families_and_rejects_unknown() -> None:
    assert list(VARIANTS) == [f"coatnet_{i}" for i in range(8)]
    assert variant_names() == list(VARIANTS) + list(TIMM_VARIANTS)
    assert len(TIMM_VARIANTS) == 22
    with pytest.raises(UnknownVariantError, match=r"coatnet_0, coatnet_1.*coatnet_7"):
        get_variant("coatnet_8")


def test_macs_of_coatnet_0_at_224() -> None:
    macs = count_macs(build_variant("coatnet_0", device="meta"))
    assert 4.9e9 < macs < 5.0e9


MIXED = VariantSpec(
    "mixed", (1, 2, 1, 2, 1), (8, 12, 16, 24, 32), 2, block_types=("T", "C", "T", "C")
)
"""Transformer stages at 1/4 and 1/16 and MBConv stages after them: every stage kind at once."""


def assert_cost_is_counted(spec: VariantSpec, img_size: tuple[int, int], **kwargs) -> None:
    """The arithmetic equals the parameters of the built model and torch's flop counter."""
    model = spec.build(img_size, device="meta", **kwargs)
    cost = variant_cost(spec, img_size, **kwargs)
    assert cost.parameters == count_parameters(model)
    assert cost.macs == count_macs(model)


@pytest.mark.parametrize(
    ("spec", "img_size", "kwargs"),
    [
        (get_variant("coatnet_0"), (224, 224), {}),
        (get_variant("coatnet_0"), (256, 160), {}),
        (get_variant("coatnet_1"), (224, 224), {}),
        (get_variant("coatnet_6"), (64, 96), {}),  # the tandem stage, at a small size
        (TINY, (64, 96), {"num_classes": 10}),
        (TINY, (96, 64), {"num_classes": 3, "in_channels": 1}),
        (MIXED, (64, 64), {"num_classes": 5}),
    ],
    ids=lambda v: v.name if isinstance(v, VariantSpec) else "x".join(map(str, v)) or "default",
)
def test_cost_arithmetic_equals_the_model_and_the_flop_counter(
    spec: VariantSpec, img_size: tuple[int, int], kwargs: dict
) -> None:
    assert_cost_is_counted(spec, img_size, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("img_size", [(224, 224), (256, 192)])
@pytest.mark.parametrize("name", variant_names())
def test_cost_arithmetic_of_every_variant(name: str, img_size: tuple[int, int]) -> None:
    assert_cost_is_counted(get_variant(name), img_size)


def test_variants_command_computes_without_torch() -> None:
    """`coatnet-export variants` prints the arithmetic and never imports torch or onnxruntime."""
    code = (
        "import atexit, sys; "
        "atexit.register(lambda: print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') "
        "if m in sys.modules), file=sys.stderr)); "
        "from coatnet_export.cli import main; main(['variants', '--json', '-'])"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "[]"
    rows = {row["variant"]: row for row in json.loads(run.stdout)}
    assert list(rows) == variant_names()
    for name, spec in VARIANTS.items():
        assert rows[name]["parameters"] == spec.lucid_parameters == variant_cost(spec).parameters
    assert rows["coatnet_0"]["gmacs"] == round(variant_cost(VARIANTS["coatnet_0"]).macs / 1e9, 2)


def test_coatnet_0_forward_batch_2() -> None:
    model = seeded(materialize(build_variant("coatnet_0", device="meta")))
    with torch.no_grad():
        y = model(torch.randn(2, 3, 224, 224))
    assert y.shape == (2, 1000)
    assert torch.isfinite(y).all()
    assert y.std() > 0.1


@pytest.mark.parametrize("img_size", [(160, 224), (224, 96), (64, 64)])
def test_small_config_any_multiple_of_32(img_size: tuple[int, int]) -> None:
    model = seeded(CoAtNet(img_size, **SMALL))
    with torch.no_grad():
        y = model(torch.randn(3, 3, *img_size))
    assert y.shape == (3, 7)
    assert torch.isfinite(y).all()
    for attention in model.attention_blocks():
        h, w = attention.map_size
        assert attention.relative_bias_table.shape == ((2 * h - 1) * (2 * w - 1), 2)
    assert model.attention_blocks()[0].map_size == (img_size[0] // 16, img_size[1] // 16)


def test_head_averages_whole_map() -> None:
    """A non-square map is averaged over both axes: permuting positions changes nothing."""
    model = seeded(CoAtNet((64, 128), **SMALL))
    features = torch.randn(2, 32, 2, 4)
    expected = model.fc(features.mean(dim=(2, 3)))
    head_input = features.flatten(2)[:, :, torch.randperm(8)].reshape(2, 32, 2, 4)
    torch.testing.assert_close(model.fc(head_input.mean(dim=(2, 3))), expected)


def test_relative_index_on_3x2_map_by_hand() -> None:
    expected = torch.tensor(
        [
            [7, 6, 4, 3, 1, 0],
            [8, 7, 5, 4, 2, 1],
            [10, 9, 7, 6, 4, 3],
            [11, 10, 8, 7, 5, 4],
            [13, 12, 10, 9, 7, 6],
            [14, 13, 11, 10, 8, 7],
        ]
    )
    assert torch.equal(relative_index(3, 2), expected)


def test_bias_of_token_pair_is_table_entry_of_its_offset() -> None:
    attention = RelativeAttention(8, 8, (3, 2), num_heads=2, numerics=Numerics())
    with torch.no_grad():
        # the table row for offset (dr, dc) holds 100*dr + dc (head 0) and its negative (head 1)
        offsets = [(dr, dc) for dr in range(-2, 3) for dc in range(-1, 2)]
        table = torch.tensor([[100.0 * dr + dc, -(100.0 * dr + dc)] for dr, dc in offsets])
        attention.relative_bias_table.copy_(table)
    bias = attention.relative_bias()
    coords = [(t // 2, t % 2) for t in range(6)]
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            assert bias[0, i, j] == 100 * (ri - rj) + (ci - cj)
            assert bias[1, i, j] == -(100 * (ri - rj) + (ci - cj))


def test_attention_block_against_handwritten_formula() -> None:
    torch.manual_seed(1)
    heads, d, tokens, dim_in, dim_out = 3, 32, 8, 16, 20
    attention = RelativeAttention(dim_in, dim_out, (2, 4), heads, Numerics())
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, tokens, dim_in)
    coords = [(t // 4, t % 4) for t in range(tokens)]
    w_qkv = attention.to_qkv.weight
    w_out, b_out = attention.to_out[0].weight, attention.to_out[0].bias
    table = attention.relative_bias_table
    expected = torch.zeros(2, tokens, dim_out)
    for b in range(2):
        heads_out = []
        for h in range(heads):
            q = x[b] @ w_qkv[h * d : (h + 1) * d].T
            k = x[b] @ w_qkv[heads * d + h * d : heads * d + (h + 1) * d].T
            v = x[b] @ w_qkv[2 * heads * d + h * d : 2 * heads * d + (h + 1) * d].T
            bias = torch.tensor(
                [
                    [table[(ri - rj + 1) * 7 + (ci - cj + 3), h].item() for rj, cj in coords]
                    for ri, ci in coords
                ]
            )
            scores = q @ k.T / math.sqrt(d) + bias
            heads_out.append(torch.softmax(scores, dim=-1) @ v)
        expected[b] = torch.cat(heads_out, dim=-1) @ w_out.T + b_out
    with torch.no_grad():
        torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


def test_baked_bias_gives_identical_outputs() -> None:
    model = seeded(CoAtNet((64, 96), **SMALL))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        for attention in model.attention_blocks():
            assert attention.bake_bias().shape == (1, 2, *[attention.relative_index.shape[0]] * 2)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("numerics", [Numerics(), Numerics.lucid()])
def test_folded_attention_scale_gives_the_same_outputs(numerics: Numerics) -> None:
    model = seeded(CoAtNet((64, 96), **SMALL, numerics=numerics))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        for attention in model.attention_blocks():
            attention.fold_scale()
            assert attention.scale == 1.0
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("numerics", [Numerics(), Numerics.lucid()])
@pytest.mark.parametrize("bake", [False, True])
def test_onnx_attention_operator_gives_the_same_outputs(numerics: Numerics, bake: bool) -> None:
    """The export's one-operator attention (torch.onnx.ops.attention) equals the matrix
    products, with the scale folded or not and the bias baked or gathered."""
    model = seeded(CoAtNet((64, 96), **SMALL, numerics=numerics))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        for attention in model.attention_blocks():
            attention.onnx_attention = True
            if bake:
                attention.bake_bias()
                attention.fold_scale()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_token_stage_equals_blocks_one_by_one() -> None:
    """A stage passing tokens between blocks computes what the blocks do on maps, one by one."""
    model = seeded(CoAtNet((64, 96), **SMALL))
    x = torch.randn(2, 16, 8, 12)  # S2's output: the input of the Transformer stage S3
    with torch.no_grad():
        expected = x
        for block in model.s3:
            expected = block(expected)
        torch.testing.assert_close(model.s3(x), expected, rtol=1e-6, atol=1e-6)
    assert expected.shape == (2, 24, 4, 6)


def test_bias_tables_matter() -> None:
    """Seeded tables are not zero, so a wrong index or a dropped bias changes the output."""
    model = seeded(CoAtNet((64, 64), **SMALL))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        for attention in model.attention_blocks():
            attention.relative_bias_table.zero_()
        assert (model(x) - before).abs().max() > 1e-2


def test_seeded_initialisation_is_deterministic_and_seed_dependent() -> None:
    def logits(seed: int) -> torch.Tensor:
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        with torch.device("meta"):
            model = CoAtNet((64, 64), **SMALL)
        model = seeded(materialize(model), seed)
        with torch.no_grad():
            return model(torch.ones(1, 3, 64, 64))

    assert torch.equal(logits(3), logits(3))
    assert not torch.equal(logits(3), logits(4))


def test_batchnorm_statistics_are_randomised() -> None:
    model = seeded(CoAtNet((64, 64), **SMALL))
    bn = model.s0[0][1]
    assert bn.running_mean.abs().max() > 0
    assert (bn.running_var != 1).all()


def test_lucid_numerics_change_gelu_pool_and_scale() -> None:
    base = seeded(CoAtNet((64, 64), **SMALL))
    lucid = seeded(CoAtNet((64, 64), **SMALL, numerics=Numerics.lucid()))
    assert lucid.s0[0][2].approximate == "tanh"
    attention = lucid.attention_blocks()[0]
    assert attention.scale == pytest.approx(math.sqrt(32))
    assert base.attention_blocks()[0].scale == pytest.approx(1 / math.sqrt(32))
    x = -torch.rand(1, 4, 4, 4) - 1  # all negative: zero padding wins at the borders
    pooled = lucid.s1[0].pool(x)
    assert pooled[0, 0, 0, 0] == 0
    torch.testing.assert_close(base.s1[0].pool(x), F.max_pool2d(x, 3, 2, 1))


def test_tandem_stage_stays_at_one_sixteenth() -> None:
    tandem = Tandem(num_blocks=(2, 3), channels=(24, 40))
    model = seeded(
        CoAtNet(
            (64, 96),
            3,
            [1, 1, 1, 9, 1],
            [8, 12, 16, 99, 48],
            num_classes=5,
            num_heads=2,
            tandem=tandem,
        )
    )
    assert not hasattr(model, "s3")
    assert [type(b).__name__ for b in model.s3_tandem[0]] == ["MBConv"] * 2
    assert [type(b).__name__ for b in model.s3_tandem[1]] == ["Transformer"] * 3
    first_transformer = model.s3_tandem[1][0]
    assert first_transformer.proj is not None and not first_transformer.downsample
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        features = model.s3_tandem(model.s2(model.s1(model.s0(x))))
        y = model(x)
    assert features.shape == (3, 40, 4, 6)
    assert y.shape == (3, 5)
    assert torch.isfinite(y).all()
    keys = model.state_dict().keys()
    assert "s3_tandem.1.0.proj.weight" in keys
    assert "s3_tandem.1.0.attn.1.fn.relative_bias_table" in keys


def test_relative_index_is_not_saved() -> None:
    keys = CoAtNet((64, 64), **SMALL).state_dict().keys()
    assert not any("relative_index" in k for k in keys)
    assert "s3.0.attn.1.fn.relative_bias_table" in keys
    assert "s3.0.ff.1.fn.ff.3.weight" in keys


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_blocks=[2, 2, 6, 2]), "4 entries.*5"),
        (dict(channels=[64, 128, 256, 512]), "4 entries.*5"),
        (dict(num_blocks=[1, 1, 1, 1, 1, 1]), "5 entries"),
        (dict(block_types=["C", "X", "T", "T"]), "unknown block type.*'X'"),
        (dict(block_types=["C", "T", "T"]), "block_types must have 4"),
        (dict(img_size=(100, 64)), "multiples of 32.*\\(96, 64\\)"),
        (dict(img_size=(64,)), "height, width"),
        (dict(num_heads=0), "num_heads"),
    ],
)
def test_invalid_configurations(kwargs: dict, message: str) -> None:
    config = dict(img_size=(64, 64), **SMALL)
    config.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        CoAtNet(**config)


@pytest.mark.slow
def test_full_coatnet_6_forward() -> None:
    start = time.perf_counter()
    model = init_weights(materialize(build_variant("coatnet_6", device="meta")), 0).eval()
    built = time.perf_counter()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 224, 224))
    done = time.perf_counter()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"coatnet_6: build+init {built - start:.1f} s, forward (batch 1) {done - built:.1f} s, "
        f"peak RSS {peak_gib:.1f} GiB"
    )
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all()
