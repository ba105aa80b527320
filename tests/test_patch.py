"""fastchat_ft.patch: for every model type in the table, a tiny random model (built from a config, no download)
gives the same loss and gradients patched as HF's own unpatched forward (reference: HF's ForCausalLMLoss and
RMSNorm code), with ignored labels and with num_items_in_batch; the kernels are really called; undo restores
the original forwards exactly. Plus peft LoRA layers, fallbacks, and the bad-input errors."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastchat_ft  # noqa: E402
import fastchat_ft.kernels as kernels  # noqa: E402
from fastchat_ft.errors import ModelError  # noqa: E402
from fastchat_ft.model.patch import FAMILIES  # noqa: E402

torch.set_num_threads(1)

CONFIG_CLASS = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
    "smollm3": "SmolLM3Config", "phi3": "Phi3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
}
VOCAB = 101


def tiny_model(model_type: str, seed: int = 0, **extra):
    cfg_cls = getattr(transformers, CONFIG_CLASS[model_type])
    kw = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              attention_dropout=0.0)
    if FAMILIES[model_type].softcap_attr:
        kw[FAMILIES[model_type].softcap_attr] = 3.0  # small, so a missing or misplaced softcap shows in the loss
    kw.update(extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg_cls(**kw))
    with torch.no_grad():  # random norm weights: Gemma's zero init (1 + w = 1) would hide a wrong offset
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
            elif p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model.train()


def batch(seed: int = 1, rows: int = 3, length: int = 17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100                    # a prompt
    if rows > 1:
        labels[1, 3:9] = -100               # a masked span in the middle
    if rows > 2:
        labels[2, :-4] = -100               # only the last tokens labelled
    if rows > 3:
        labels[3, :] = -100                 # a row with nothing to learn
    return ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_close_grads(got, want, rtol=1e-4, atol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count calls into the kernels, so a parity test cannot pass by silently running HF's own code."""
    calls = {"rms_norm": 0, "fused_linear_cross_entropy": 0, "lora_linear": 0, "swiglu": 0}
    for name in calls:
        real = getattr(kernels, name)

        def counting(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(kernels, name, counting)
    return calls


def forwards(model) -> dict:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_patched_loss_and_grads_equal_hf(model_type, kernel_calls):
    model = tiny_model(model_type)
    ids, labels = batch()
    n_items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 5)  # as if other micro-batches held 5 more
    want_mean, want_grads_mean = loss_and_grads(model, input_ids=ids, labels=labels)
    want_sum, want_grads_sum = loss_and_grads(model, input_ids=ids, labels=labels, num_items_in_batch=n_items)
    before, params = forwards(model), [id(p) for p in model.parameters()]

    handle = fastchat_ft.patch(model)
    n_norms = sum(type(m).__name__ == FAMILIES[model_type].norm_class for m in model.modules())
    n_mlps = sum(type(m).__name__ == FAMILIES[model_type].mlp_class for m in model.modules())
    assert handle.rms_norms == n_norms > 0 and handle.fused_loss and handle.skipped == []
    assert handle.swiglu_mlps == n_mlps and (n_mlps > 0) == (FAMILIES[model_type].mlp_class is not None)
    assert "model.norm" in handle.replaced and type(model).__name__ in handle.replaced
    assert len(handle.replaced) == n_norms + 1 + n_mlps

    got, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert got.logits is None  # the [tokens x vocab] logits were never built
    torch.testing.assert_close(got.loss, want_mean.loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, want_grads_mean)
    got, grads = loss_and_grads(model, input_ids=ids, labels=labels, num_items_in_batch=n_items)
    torch.testing.assert_close(got.loss, want_sum.loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, want_grads_sum)
    assert kernel_calls["fused_linear_cross_entropy"] == 2
    assert kernel_calls["rms_norm"] == 2 * n_norms
    assert kernel_calls["swiglu"] == 2 * n_mlps

    handle.undo()
    assert forwards(model) == before and "forward" not in model.__dict__
    assert [id(p) for p in model.parameters()] == params
    calls = dict(kernel_calls)
    again, _ = loss_and_grads(model, input_ids=ids, labels=labels)
    assert kernel_calls == calls  # nothing of ours runs after undo
    assert torch.equal(again.loss, want_mean.loss) and again.logits is not None


def saved_activation_bytes(model, ids, labels) -> int:
    """Bytes of the distinct storages autograd keeps for backward over one forward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return sum(kept.values())


def test_swiglu_keeps_one_intermediate_activation_less_per_layer_with_the_same_gradients(monkeypatch):
    monkeypatch.setenv("FASTCHAT_FT_CPU_SWIGLU", "0")  # the torch path: bit-identical to eager
    model = tiny_model("llama")
    ids, labels = batch()
    want, want_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    eager_bytes = saved_activation_bytes(model, ids, labels)
    fastchat_ft.patch(model, rms_norm=False, loss=False, lora=False)
    got, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert torch.equal(got.loss, want.loss)  # the torch path is eager's ops in eager's order
    for name in want_grads:
        assert torch.equal(grads[name], want_grads[name]), name
    cfg = model.config
    one_activation = ids.numel() * cfg.intermediate_size * 4  # [tokens x intermediate] fp32
    assert eager_bytes - saved_activation_bytes(model, ids, labels) == cfg.num_hidden_layers * one_activation


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_recomputed_down_input_gives_eagers_gradients_with_our_lora(checkpointing, native, recompute_recipes,
                                                                    monkeypatch):
    """recompute_down_input on CPU (its default is CUDA only): the loss and LoRA gradients of eager (bit-identical
    on the torch path, within float rounding on the native one, whose recompute is the same kernel), and every
    layer's down projection input became a recompute recipe, except under activation checkpointing, whose own
    saved-tensor hooks take over."""
    from fastchat_ft.model import lora as lora_mod

    monkeypatch.setenv("FASTCHAT_FT_CPU_SWIGLU", "1" if native else "0")
    model = tiny_model("llama")
    lora_mod.add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj", "gate_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # B starts at zero: make the LoRA path count
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = batch()
    want, want_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    fastchat_ft.patch(model, rms_norm=False, loss=False, lora=False, recompute_down_input=True)
    got, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert grads.keys() == want_grads.keys()
    same = torch.equal if not native else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert same(got.loss, want.loss)
    for name in want_grads:
        assert same(grads[name], want_grads[name]), name
    assert len(recompute_recipes) == (0 if checkpointing else model.config.num_hidden_layers)


def test_patched_layers_compile(monkeypatch):
    """torch.compile over patched decoder layers (the engine's torch_compile option): the same loss and gradients
    as eager; the recompute hook steps aside there (AOTAutograd decides what is saved)."""
    import importlib

    from fastchat_ft.model import lora as lora_mod

    swiglu_mod = importlib.import_module("fastchat_ft.kernels.swiglu")
    model = tiny_model("llama")
    lora_mod.add_lora(model, 4, 8, 0.0, ["q_proj", "down_proj"])
    ids, labels = batch()
    want, want_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    fastchat_ft.patch(model, loss=False, lora=False, recompute_down_input=True)
    for layer in model.model.layers:
        layer.compile(backend="aot_eager")
    monkeypatch.setattr(swiglu_mod, "_Recompute", None)  # constructing a recipe would raise
    got, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    assert_close_grads(grads, want_grads, rtol=1e-5, atol=1e-6)


def test_mlps_with_another_activation_are_left_alone(kernel_calls):
    model = tiny_model("llama", hidden_act="gelu")
    ids, labels = batch()
    want, _ = loss_and_grads(model, input_ids=ids, labels=labels)
    handle = fastchat_ft.patch(model)
    assert handle.swiglu_mlps == 0 and handle.skipped == ["swiglu: 2 LlamaMLP with act_fn GELUActivation, not SiLU"]
    got, _ = loss_and_grads(model, input_ids=ids, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert kernel_calls["swiglu"] == 0


def test_an_mlp_class_from_outside_transformers_is_left_alone(kernel_calls):
    """Remote code may reuse transformers' class names for other computations: only transformers' own is patched."""
    from transformers.models.llama.modeling_llama import LlamaMLP as TransformersLlamaMLP

    class LlamaMLP(TransformersLlamaMLP):  # same name, defined here (as remote code would be)
        pass

    model = tiny_model("llama")
    model.model.layers[0].mlp.__class__ = LlamaMLP
    handle = fastchat_ft.patch(model)
    assert handle.swiglu_mlps == 1 and len(handle.skipped) == 1
    assert handle.skipped[0].startswith("model.layers.0.mlp: test_patch.LlamaMLP is not transformers'")
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert kernel_calls["swiglu"] == 1


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_patched_rms_norms_equal_hf_bitwise_in_bf16(model_type):
    """Each family's casting rule (Llama: cast, then * w; Gemma: * (1 + w) in fp32, cast last) and eps field:
    on CPU our norm must give HF's bf16 output bit for bit, where a wrong rule shows up as rounding."""
    model = tiny_model(model_type).to(torch.bfloat16)
    norms = [m for m in model.modules() if type(m).__name__ == FAMILIES[model_type].norm_class]
    g = torch.Generator().manual_seed(3)
    inputs = [(torch.randn(3, 5, m.weight.shape[0], generator=g) * 4).to(torch.bfloat16) for m in norms]
    with torch.no_grad():
        want = [m(x) for m, x in zip(norms, inputs)]
        fastchat_ft.patch(model, loss=False)
        got = [m(x) for m, x in zip(norms, inputs)]
    assert all("forward" in m.__dict__ for m in norms)
    for w, o in zip(want, got):
        assert o.dtype == w.dtype and torch.equal(o, w)


def test_gradient_accumulation_matches_one_big_batch():
    """HF's num_items_in_batch rule: micro-batch losses, each sum / (labelled tokens of the whole step), add up
    to the mean over the whole step, whatever the split (the GA bug reported in Liger #802, axolotl #2262)."""
    model = tiny_model("llama")
    ids, labels = batch(rows=4, length=15)
    labels[3, :12] = -100  # uneven label counts per micro-batch
    fastchat_ft.patch(model)
    full, full_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    n_items = torch.tensor(int((labels[:, 1:] != -100).sum()))
    model.zero_grad(set_to_none=True)
    total = 0.0
    for part in (slice(0, 1), slice(1, 4)):
        loss = model(input_ids=ids[part], labels=labels[part], num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full.loss.item(), rel=1e-5)
    accumulated = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_close_grads(accumulated, full_grads)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_packed_row_equals_its_documents_run_alone(model_type):
    """A packed row (position_ids restarting per document, first label of each document -100, no attention
    mask) gives exactly the documents' own losses: no document sees another, even with config.use_cache on."""
    model = tiny_model(model_type)
    assert model.config.use_cache  # the default that would make HF attend across documents
    g = torch.Generator().manual_seed(5)
    docs = []
    for length in (7, 11, 5):
        ids = torch.randint(3, VOCAB, (1, length), generator=g)
        labels = ids.clone()
        labels[0, : length // 2] = -100  # prompt part (includes the first token)
        docs.append((ids, labels))
    ids = torch.cat([d[0] for d in docs], 1)
    labels = torch.cat([d[1] for d in docs], 1)
    position_ids = torch.cat([torch.arange(d[0].shape[1]) for d in docs])[None]
    n_items = int((labels[:, 1:] != -100).sum())
    fastchat_ft.patch(model)
    packed = model(input_ids=ids, labels=labels, position_ids=position_ids).loss
    alone = sum(model(input_ids=d_ids, labels=d_labels, num_items_in_batch=n_items).loss for d_ids, d_labels in docs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)


def test_triton_kernels_through_the_patch_under_the_interpreter(monkeypatch, kernel_calls):
    """The same parity with the Triton kernels themselves (run by the interpreter on CPU), not their references."""
    pytest.importorskip("triton")
    peft = pytest.importorskip("peft")
    model = tiny_model("gemma2")  # offset RMSNorm, softcap and tied embeddings in one model
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                       init_lora_weights=False))
    ids, labels = batch(rows=2, length=9)
    want, want_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    fastchat_ft.patch(model)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    assert_close_grads(grads, want_grads, rtol=1e-3, atol=1e-4)
    assert kernel_calls["fused_linear_cross_entropy"] == 1 and kernel_calls["rms_norm"] > 0
    assert kernel_calls["lora_linear"] == 4


def test_eval_mode_and_unlabelled_calls_run_the_original_forward(kernel_calls):
    model = tiny_model("qwen3")
    ids, labels = batch()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels)
    handle = fastchat_ft.patch(model, rms_norm=False)
    with torch.no_grad():
        got = model(input_ids=ids, labels=labels)
        logits_only = model(ids)  # positional input_ids, no labels
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(logits_only.logits, want.logits)
    assert kernel_calls["fused_linear_cross_entropy"] == 0 and handle.rms_norms == 0


def test_positional_labels_and_tuple_output():
    model = tiny_model("mistral")
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels).loss
    fastchat_ft.patch(model)
    sig = list(__import__("inspect").signature(model.forward).parameters)
    args = [None] * (sig.index("labels") + 1)
    args[0], args[-1] = ids, labels
    got = model(*args)
    torch.testing.assert_close(got.loss, want)
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], want)


def test_gradient_checkpointing_and_generate_still_work():
    model = tiny_model("qwen3")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = batch()
    want, want_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    model.eval()
    want_tokens = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    model.train()
    fastchat_ft.patch(model)
    got, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, want_grads)
    model.eval()
    assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False), want_tokens)


def test_trainer_sees_the_original_signature():
    """HF Trainer passes num_items_in_batch only to a forward that takes **kwargs; generate() checks names."""
    import inspect

    model = tiny_model("llama")
    want = inspect.signature(model.forward)
    fastchat_ft.patch(model)
    assert inspect.signature(model.forward) == want


def test_peft_lora_layers_use_the_kernel_and_match_peft(kernel_calls):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)  # random B: a zero B would hide a wrong LoRA path
    model = peft.get_peft_model(base, cfg)
    ids, labels = batch()
    want, want_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    before = forwards(model)
    handle = fastchat_ft.patch(model)
    assert handle.lora_layers == 2 * 3 and handle.fused_loss
    assert "base_model.model.model.layers.1.mlp.down_proj" in handle.replaced
    got, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert kernel_calls["lora_linear"] == 6 and kernel_calls["fused_linear_cross_entropy"] == 1
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, want_grads)
    assert grads.keys() == want_grads.keys() and any("lora_A" in n for n in grads)

    calls = kernel_calls["lora_linear"]
    with model.disable_adapter():  # peft's own path (base model only) on this call
        plain = model(input_ids=ids, labels=labels).loss
    assert kernel_calls["lora_linear"] == calls
    with model.disable_adapter():
        handle.undo()
        want_plain = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(plain, want_plain)
    assert forwards(model) == before


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_bf16_patched_model_is_as_close_to_float64_as_hf_bf16(model_type):
    """bf16 weights with fp32 peft adapters (the usual LoRA set-up): against the same model in float64, our
    loss and gradients are no further off than HF's own bf16 forward (casting rules kept, no extra rounding)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(model_type).to(torch.bfloat16), peft.LoraConfig(
        r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ids, labels = batch()
    exact, exact_grads = loss_and_grads(copy.deepcopy(model).double(), input_ids=ids, labels=labels)
    hf, hf_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    fastchat_ft.patch(model)
    ours, our_grads = loss_and_grads(model, input_ids=ids, labels=labels)

    def grad_error(grads):
        return max(float((grads[n].double() - g).norm() / g.norm()) for n, g in exact_grads.items())

    assert abs(ours.loss.item() - exact.loss.item()) <= 2 * abs(hf.loss.item() - exact.loss.item()) + 1e-3
    assert grad_error(our_grads) <= 1.5 * grad_error(hf_grads) + 5e-3
    assert grad_error(our_grads) < 0.05


def test_peft_lora_dropout_falls_back_to_peft_while_training(kernel_calls):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("qwen2"), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                                     target_modules=["q_proj"]))
    ids, labels = batch()
    fastchat_ft.patch(model)
    model(input_ids=ids, labels=labels).loss.backward()
    assert kernel_calls["lora_linear"] == 0  # dropout active: the kernel has none, so peft runs
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert kernel_calls["lora_linear"] == 2  # eval: dropout is the identity, the kernel applies


def test_lm_head_that_is_not_a_plain_linear_keeps_hf_loss(kernel_calls):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels).loss
    fastchat_ft.patch(model)
    got = model(input_ids=ids, labels=labels)
    assert kernel_calls["fused_linear_cross_entropy"] == 0 and got.logits is not None
    torch.testing.assert_close(got.loss, want)


def test_deep_copy_of_a_patched_model_runs_its_own_weights(kernel_calls):
    """EMA / reference models are deep copies: the copy's fallbacks must use the copy, not the original."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                     init_lora_weights=False))
    ids, labels = batch()
    fastchat_ft.patch(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    reference = copy.deepcopy(twin)
    for m in reference.modules():  # strip our forwards: plain HF + peft code on the copy's weights
        m.__dict__.pop("forward", None)
    for mode in ("train", "eval"):
        getattr(twin, mode)()
        getattr(reference, mode)()
        with torch.no_grad(), twin.disable_adapter(), reference.disable_adapter():  # LoRA fallback path
            torch.testing.assert_close(twin(input_ids=ids, labels=labels).loss,
                                       reference(input_ids=ids, labels=labels).loss)
        with torch.no_grad():
            torch.testing.assert_close(twin(input_ids=ids, labels=labels).loss,
                                       reference(input_ids=ids, labels=labels).loss)
    assert kernel_calls["fused_linear_cross_entropy"] > 0 and kernel_calls["lora_linear"] > 0


def test_unknown_model_type_lists_the_supported_ones():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ModelError) as err:
        fastchat_ft.patch(model)
    text = str(err.value)
    assert "'gpt2'" in text and all(name in text for name in FAMILIES)
    assert "forward" not in model.__dict__


def test_patching_twice_is_refused_and_undo_is_idempotent():
    model = tiny_model("gemma")
    handle = fastchat_ft.patch(model)
    with pytest.raises(ModelError, match="already patched"):
        fastchat_ft.patch(model)
    fastchat_ft.unpatch(handle)
    handle.undo()
    assert not handle.active and "forward" not in model.__dict__
    second = fastchat_ft.patch(copy.deepcopy(model))  # a fresh copy of an unpatched model patches fine
    assert second.rms_norms == handle.rms_norms


def test_patching_a_deep_copy_of_a_patched_model_is_refused():
    """A deep copy carries our forwards (bound to the copy): patching it again would wrap ours in ours, and the new
    handle's undo would bring back the first patch's forwards instead of transformers' own."""
    model = tiny_model("llama")
    fastchat_ft.patch(model)
    twin = copy.deepcopy(model)
    before = forwards(twin)
    with pytest.raises(ModelError, match="copy of a patched model"):
        fastchat_ft.patch(twin)
    assert forwards(twin) == before


def test_undo_leaves_a_later_wrapper_in_place(caplog):
    """A trainer that wraps the patched forward (TRL's fused LM head does) keeps its wrapper after our undo."""
    model = tiny_model("llama")
    handle = fastchat_ft.patch(model)
    ours = model.forward
    model.forward = lambda *a, **k: ours(*a, **k)
    wrapper = model.forward
    handle.undo()
    assert model.forward is wrapper and "replaced after patching" in caplog.text


def test_patch_logs_once_what_it_patched(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="fastchat_ft")
    model = tiny_model("smollm3")
    fastchat_ft.patch(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "fastchat_ft"]
    assert len(lines) == 1 and "smollm3" in lines[0] and "5 RMSNorm" in lines[0]
    model(input_ids=batch()[0], labels=batch()[1]).loss.backward()
    assert len([r for r in caplog.records if r.name == "fastchat_ft"]) == 1  # not once per call


def test_import_fastchat_ft_does_not_import_torch():
    code = "import sys, fastchat_ft; assert 'torch' not in sys.modules; print(callable(fastchat_ft.patch))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
