"""The activation dtype (model/precision.py): bf16 only where the processor computes it natively,
and a bf16 forward and training step that agree with transformers and with fp32."""
import json

import pytest
import torch

import model.precision as precision
import predict
import train
from engine.build import build_model
from engine.loss import compute_loss
from data.batches import RowDataset
from data.prompt import Encoder
from data.read import read_table
from lora.inject import apply_lora, lora_modules
from lora.io import read_record
from model.precision import choose_activations
from model.tokenizer import Tokenizer
from tiny import SHORT_PROMPT, make_workdir, train_args

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("precision"), n_rows=60, n_val=12, seed=5)


def fake_cpu(monkeypatch, machine="x86_64", amx=False, avx512_bf16=False, flags=(), onednn=True):
    """Pretend to be another processor: torch's probes, the kernel's flags, the architecture."""
    probes = {"_is_amx_tile_supported": amx, "_is_avx512_bf16_supported": avx512_bf16}
    monkeypatch.setattr(precision, "_torch_probe", lambda name: probes.get(name))
    monkeypatch.setattr(precision, "_cpu_flags", lambda: set(flags))
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(precision.torch.backends.mkldnn, "is_available", lambda: onednn)


# ----------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("cpu, want", [
    (dict(), "fp32"),  # AVX2-only x86: bf16 would be emulated
    (dict(flags=("avx2", "avx512f", "avx512_vnni")), "fp32"),
    (dict(avx512_bf16=True), "bf16"),  # Zen 4/5, Cooper Lake
    (dict(amx=True), "bf16"),  # Sapphire Rapids and later
    (dict(avx512_bf16=True, onednn=False), "fp32"),  # a torch without oneDNN cannot use it
    (dict(machine="aarch64", flags=("fp", "asimd", "sve")), "fp32"),  # Graviton 2
    (dict(machine="aarch64", flags=("fp", "asimd", "sve", "bf16")), "bf16"),  # Graviton 3
])
def test_auto_takes_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, cpu, want):
    fake_cpu(monkeypatch, **cpu)
    for base in ("int8", "nf4"):
        got, why = choose_activations(base, CPU, "auto")
        assert got == want, why
    assert choose_activations("int8", torch.device("cuda"), "auto")[0] == "bf16"  # a GPU: bf16
    assert choose_activations("fp32", CPU, "auto") == ("fp32", "--precision fp32")  # the exact reference


def test_an_older_torch_without_probes_reads_the_kernels_flags(monkeypatch):
    fake_cpu(monkeypatch, flags=("avx512f", "avx512_bf16"))
    monkeypatch.setattr(precision, "_torch_probe", lambda name: None)
    assert choose_activations("int8", CPU) == ("bf16", "auto: the CPU has avx512_bf16")
    fake_cpu(monkeypatch, flags=("avx2",))
    monkeypatch.setattr(precision, "_torch_probe", lambda name: None)
    assert choose_activations("int8", CPU)[0] == "fp32"


def test_explicit_choices_and_their_limits(monkeypatch):
    fake_cpu(monkeypatch)  # no native bf16
    assert choose_activations("int8", CPU, "fp32") == ("fp32", "--activations fp32")
    got, why = choose_activations("int8", CPU, "bf16")  # asked for: given, with the cost named
    assert got == "bf16" and "emulated" in why
    with pytest.raises(precision.UserError, match="applies to an int8 or nf4 base"):
        choose_activations("fp32", CPU, "bf16")


def test_train_records_the_resolved_dtype_and_predict_scores_as_trained(tiny, tmp_path, monkeypatch, capsys):
    fake_cpu(monkeypatch)  # a CPU without bf16: auto must say fp32, everywhere it is written
    run = tmp_path / "run"
    assert train.main(train_args(tiny, run, "--steps", "1", "--batch-size", "2", "--grad-accum", "1")) == 0
    err = capsys.readouterr().err
    assert "int8 on cpu, activations fp32 (auto: the CPU has no native bf16" in err
    assert json.loads((run / "args.json").read_text())["activations"] == "fp32"
    assert read_record(run / "adapter_model.safetensors")["activations"] == "fp32"

    fake_cpu(monkeypatch, avx512_bf16=True)
    run16 = tmp_path / "run16"
    assert train.main(train_args(tiny, run16, "--steps", "1", "--batch-size", "2", "--grad-accum", "1")) == 0
    assert read_record(run16 / "adapter_model.safetensors")["activations"] == "bf16"
    capsys.readouterr()
    out = ["--data", str(tiny / "val.csv"), "--out", str(tmp_path / "s.csv"), "--device", "cpu"]
    assert predict.main(["--adapter", str(run16), *out]) == 0
    assert "activations bf16: as trained" in capsys.readouterr().err
    fake_cpu(monkeypatch)  # scored on a CPU without bf16: fp32, said, never emulated bf16
    assert predict.main(["--adapter", str(run16), *out]) == 0
    assert "activations fp32: trained with bf16; this CPU has no native bf16" in capsys.readouterr().err
    with pytest.raises(precision.UserError, match="--activations differ"):  # resume is exact or refused
        train.main(train_args(tiny, run16, "--steps", "1", "--batch-size", "2", "--grad-accum", "1", "--resume"))


# ----------------------------------------------------------------------------- bf16 arithmetic

transformers = pytest.importorskip("transformers")

# bf16 keeps 8 significant bits: two stacks computing the same bf16 model round differently at
# each op, so logits agree to about 1% of their scale, not to float32's 1e-5.
BF16_LOGITS_RTOL = 0.02  # max |ours - theirs| / max |theirs|
BF16_P_ATOL = 0.01  # p_true = softmax over the two label logits, in fp32 on both sides


def rows(tiny, n=6):
    tok = Tokenizer.from_dir(tiny / "model")
    df, _ = read_table(tiny / "val.csv")
    ds = RowDataset(df, Encoder(tok, SHORT_PROMPT, 128, "answer"), pad_id=tok.pad_id)
    return ds.batch(list(range(n))), tok


def test_int8_with_bf16_activations_matches_transformers_in_bf16(tiny):
    # transformers in bf16 on the weights our 8-bit layers compute with (dequantized to bf16).
    ours = build_model(tiny / "model", "int8", CPU, "bf16")
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny / "model", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, m in ours.named_modules():
            if hasattr(m, "dequantize") and hasattr(m, "SCB"):
                hf.get_submodule(name).weight.copy_(m.dequantize(torch.bfloat16))
    batch, tok = rows(tiny)
    ids, mask, cue = batch["input_ids"], batch["attention_mask"], batch["cue_pos"]
    with torch.no_grad():
        got = ours(ids, mask, logits_at=cue).float()
        ref = hf(input_ids=ids, attention_mask=mask.long()).logits[torch.arange(len(ids)), cue].float()
    assert ours.activation_dtype == torch.bfloat16
    assert (got - ref).abs().max() <= BF16_LOGITS_RTOL * ref.abs().max()
    t, f = tok.label_ids()
    p = lambda lg: torch.softmax(lg[:, [f, t]], -1)[:, 1]
    assert (p(got) - p(ref)).abs().max() <= BF16_P_ATOL
    # ...and the same check fails for a model that is not the same function:
    assert (ours(ids.roll(1, 1), mask, logits_at=cue).float() - ref).abs().max() > BF16_LOGITS_RTOL * ref.abs().max()


def test_a_bf16_training_step_has_the_fp32_steps_gradient(tiny):
    # The same adapter (A and B in fp32 on both), dropout off: only the activations' dtype differs.
    batch, _ = rows(tiny, n=4)
    grads = {}
    for acts in ("fp32", "bf16"):
        model = build_model(tiny / "model", "int8", CPU, acts)
        torch.manual_seed(0)
        apply_lora(model, r=4, alpha=8, dropout=0.0)
        for m in lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
            assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32
        model.train()
        loss = compute_loss(model, batch, "answer", CPU)
        assert loss.dtype == torch.float32  # the loss in fp32 whatever the activations
        loss.backward()
        grads[acts] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    g32, g16 = grads["fp32"], grads["bf16"]
    cos = torch.nn.functional.cosine_similarity(g32, g16, dim=0)
    rel = (g16 - g32).norm() / g32.norm()
    assert cos > 0.999 and rel < 0.05, (cos, rel)  # bf16 rounding of the activations, nothing more


def test_bf16_scores_depend_on_batching_only_at_bf16_rounding(tiny):
    # In fp32 a row's p_true is the same in any batch (tests/test_predict.py); in bf16 the padding
    # and shared prefix of its batch can change a GEMM's rounding, which a later bf16 rounding may
    # carry on (measured on this tiny model: half the rows bit-identical, the largest difference 3.2e-3).
    from engine.score import score
    tok = Tokenizer.from_dir(tiny / "model")
    df, _ = read_table(tiny / "val.csv")
    ds = RowDataset(df, Encoder(tok, SHORT_PROMPT, 128, "answer"), pad_id=tok.pad_id)
    model = build_model(tiny / "model", "int8", CPU, "bf16")
    alone, batched = (score(model, ds, b, CPU, tok.label_ids(), progress=False) for b in (1, 5))
    assert abs(alone - batched).max() < 1e-2


def test_the_memory_estimate_counts_the_real_activation_size(tiny):
    from engine.config import TrainConfig
    from engine.memory import estimate_peak_gib
    cfg = TrainConfig(batch_size=64, max_seq_len=512)
    est = {a: estimate_peak_gib(build_model(tiny / "model", "int8", CPU, a), cfg, False) for a in ("fp32", "bf16")}
    assert est["bf16"] < 0.75 * est["fp32"]  # 2-byte activations and adapter inputs
    m = build_model(tiny / "model", "int8", CPU, "bf16")
    m.compute_dtype = torch.float16  # as on a T4: the same 2-byte activations, the adapters' inputs cast to fp32
    assert estimate_peak_gib(m, cfg, False) > 1.05 * est["bf16"]
