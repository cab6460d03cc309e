"""bf16/fp16 compute copies of the fp32 master weights (moetrain/mixed_precision.py): the same losses and
weights as plain autocast (which casts the same fp32 values in every forward), bit for bit; close to fp32
within bf16 rounding; the copies written once per optimizer step; fp32 masters in the model and checkpoints."""

import pytest
import torch

import moetrain.main_grad as main_grad
import moetrain.train.run as run_module
from moetrain.mixed_precision import ComputeWeights, gemm_weights
from moetrain.moe.experts import accumulate_weight_grad, grouped_weight_grad
from moetrain.train.trainer import Trainer
from tests.helpers import tiny_config


def _config(tmp_path, name, precision, **training):
    cfg = tiny_config(tmp_path, save=name, precision=precision, train_iters=3, lr_decay_style="constant",
                      **training)
    cfg.training.global_batch_size = 8  # 2 micro-batches of 4 per step
    return cfg


def _trained(cfg, monkeypatch, copies: bool) -> tuple[Trainer, list[float]]:
    with monkeypatch.context() as patch:
        if not copies:
            patch.setattr(run_module, "applies_to", lambda precision, zero_stage: False)  # plain autocast
        trainer = Trainer(cfg, quiet=True)
    return trainer, trainer.fit().losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_compute_copies_give_plain_autocasts_results_bit_for_bit(tmp_path, monkeypatch, precision):
    with_copies, losses = _trained(_config(tmp_path, "copies", precision), monkeypatch, copies=True)
    plain, plain_losses = _trained(_config(tmp_path, "plain", precision), monkeypatch, copies=False)
    assert isinstance(with_copies.compute_weights, ComputeWeights) and plain.compute_weights is None
    assert losses == plain_losses
    for (name, got), want in zip(with_copies.model.state_dict().items(), plain.model.state_dict().values()):
        assert got.dtype == torch.float32 and torch.equal(got, want), name  # fp32 masters, the same values
    # written from the initial weights, then from each of the 3 steps' (the last read by the final evaluation);
    # never per micro-batch (2 a step)
    assert with_copies.compute_weights.refreshes == 1 + 3


def test_bf16_with_compute_copies_is_close_to_fp32(tmp_path, monkeypatch):
    _, bf16 = _trained(_config(tmp_path, "bf16", "bf16"), monkeypatch, copies=True)
    _, fp32 = _trained(_config(tmp_path, "fp32", "fp32"), monkeypatch, copies=True)
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_copies_stand_in_only_inside_a_forward_and_follow_the_masters(tmp_path):
    trainer = Trainer(_config(tmp_path, "run", "bf16"), quiet=True)
    weights = trainer.compute_weights
    slots = gemm_weights(trainer.model)
    names = {f"{type(module).__name__}.{name}" for module, name in slots}
    assert names == {"Linear.weight", "GroupedExperts.w1", "GroupedExperts.w2"}
    routers = [m.router.wg for _, m in trainer.model.moe_layers()]
    assert all(module is not router for module, _ in slots for router in routers)  # routers stay fp32
    assert all(module is not trainer.model.lm_head for module, _ in slots)
    seen = []
    module, name = slots[0]
    module.register_forward_pre_hook(lambda m, args: seen.append(getattr(m, name).dtype))  # after ours
    trainer.train_step()
    assert seen == [torch.bfloat16, torch.bfloat16] and isinstance(getattr(module, name), torch.nn.Parameter)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    trainer.evaluate()  # the first forward after the step writes the copies from the new masters
    for slot_module, slot_name, copy in ((m, n, c) for m, slots in weights.slots.items() for n, _, c in slots):
        assert torch.equal(copy, getattr(slot_module, slot_name).detach().bfloat16())
    assert weights.refreshes == 2


# --- gradient-accumulation fusion: expert weight gradients written straight into the fp32 masters' .grad -------
def _blocks_and_operands(counts, width_in=8, width_out=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(counts), width_in, generator=gen).bfloat16()
    grad = torch.randn(sum(counts), width_out, generator=gen).bfloat16()
    return rows, grad


def _exact_weight_grad(rows, grad, counts):
    """float64 rows_e^T @ grad_e of the bf16 operands: what an fp32-accumulating GEMM computes, unrounded."""
    return torch.stack([r.double().t() @ g.double() for r, g in zip(rows.split(counts), grad.split(counts))])


def test_expert_weight_grads_accumulate_in_fp32_without_a_16_bit_rounding():
    counts = [5, 0, 7]  # an expert with no rows: zero in the first micro-batch, untouched after
    master = torch.nn.Parameter(torch.zeros(3, 8, 6))
    seen = []
    master.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    exact, rounded = torch.zeros(3, 8, 6, dtype=torch.float64), torch.zeros(3, 8, 6)
    for micro_batch in range(3):
        rows, grad = _blocks_and_operands(counts, seed=micro_batch)
        accumulate_weight_grad(master, rows, grad, counts)
        exact += _exact_weight_grad(rows, grad, counts)
        rounded += grouped_weight_grad(rows, grad, counts).float()  # the unfused path: a bf16 product, then +=
        assert master.grad.dtype == torch.float32 and len(seen) == micro_batch + 1  # hook as AccumulateGrad's
        assert torch.equal(seen[-1], master.grad)
    assert torch.equal(master.grad[1], torch.zeros(8, 6))
    fused_error = (master.grad.double() - exact).abs().max().item()
    assert fused_error < 1e-5 * exact.abs().max().item()  # fp32 sums of the exact products
    assert (rounded.double() - exact).abs().max().item() > 50 * fused_error  # where bf16 rounding costs ~3e-3


def test_a_reducing_hook_that_takes_the_gradient_gets_each_micro_batchs_own():
    """ZeRO-2 reduces and clears the gradient in its hook after every micro-batch: the next GEMM writes afresh."""
    counts = [4, 3]
    master = torch.nn.Parameter(torch.zeros(2, 8, 6))
    taken = []

    def reduce_and_clear(param):
        taken.append(param.grad)
        param.grad = None

    master.register_post_accumulate_grad_hook(reduce_and_clear)
    for micro_batch in range(2):
        rows, grad = _blocks_and_operands(counts, seed=micro_batch)
        accumulate_weight_grad(master, rows, grad, counts)
        torch.testing.assert_close(taken[-1].double(), _exact_weight_grad(rows, grad, counts), rtol=1e-6,
                                   atol=1e-6)


def test_expert_masters_hooks_run_once_per_micro_batch(monkeypatch):
    """Through ComputeWeights' copies, as in training: the backward's GEMMs run the hooks, no AccumulateGrad
    runs them again (a ZeRO-2 bucket would be reduced twice)."""
    import moetrain.moe.experts as experts_module

    monkeypatch.setattr(main_grad, "fused_kernels", lambda device: True)
    monkeypatch.setattr(experts_module, "use_expert_threads", lambda rows, num_experts: False)
    torch.manual_seed(0)
    experts = experts_module.GroupedExperts(3, 8, 16)
    ComputeWeights(experts, torch.bfloat16)
    seen = []
    for master in (experts.w1, experts.w2):
        master.register_post_accumulate_grad_hook(seen.append)
    for micro_batch in range(2):
        experts(torch.randn(10, 8, requires_grad=True), [4, 3, 3]).float().sum().backward()
        assert len(seen) == 2 * (micro_batch + 1) and set(map(id, seen)) == {id(experts.w1), id(experts.w2)}


def test_training_with_fused_expert_gradient_accumulation(tmp_path, monkeypatch):
    """bf16 with compute copies and the fused path on (as on CUDA): every expert weight gradient of every micro-
    batch goes into its master directly, and the losses stay the unfused step's within bf16 rounding."""
    import moetrain.moe.experts as experts_module

    monkeypatch.setattr(experts_module, "use_expert_threads", lambda rows, num_experts: False)
    _, unfused = _trained(_config(tmp_path, "unfused", "bf16"), monkeypatch, copies=True)
    calls = []

    def counted(master, rows, grad, counts):
        calls.append(master)
        assert grad.dtype == torch.bfloat16 and master.dtype == torch.float32
        return accumulate_weight_grad(master, rows, grad, counts)

    monkeypatch.setattr(main_grad, "fused_kernels", lambda device: True)
    monkeypatch.setattr(experts_module, "accumulate_weight_grad", counted)
    trainer, fused = _trained(_config(tmp_path, "fused", "bf16"), monkeypatch, copies=True)
    experts = [module.experts for _, module in trainer.model.moe_layers()]
    # 3 steps x 2 micro-batches x (w1, w2) of each MoE layer, each its master
    assert len(calls) == 3 * 2 * 2 * len(experts)
    assert set(map(id, calls)) == {id(getattr(e, name)) for e in experts for name in ("w1", "w2")}
    assert fused == pytest.approx(unfused, rel=1e-2) and fused != unfused


# --- the same for the linear layers (moetrain.main_grad.linear) ---------------------------------------------------
def test_linear_weight_grad_accumulates_in_fp32_and_the_rest_is_f_linears(monkeypatch):
    """A Linear with a bf16 compute copy (ComputeWeights' hooks, as in training), two micro-batches: output,
    input and bias gradients are F.linear's on the bf16 operands; the fp32 weight gradient the fp32 sum of
    the exact products; the master's hook runs once per micro-batch (not again by an AccumulateGrad)."""
    monkeypatch.setattr(main_grad, "fused_kernels", lambda device: True)
    torch.manual_seed(0)
    module = main_grad.Linear(8, 6)
    ComputeWeights(module, torch.bfloat16)
    seen = []
    module.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    bias_ref = module.bias.detach().clone().requires_grad_()
    exact = torch.zeros(6, 8, dtype=torch.float64)
    for micro_batch in range(2):
        x, grad = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 6).bfloat16()
        module(x).backward(grad)
        x_ref = x.detach().requires_grad_()
        out_ref = torch.nn.functional.linear(x_ref.bfloat16(), module.weight.detach().bfloat16(), bias_ref.bfloat16())
        out_ref.backward(grad)
        assert torch.equal(module(x), out_ref)
        assert torch.equal(x.grad, x_ref.grad) and torch.equal(module.bias.grad, bias_ref.grad)
        exact += grad.double().flatten(0, 1).t() @ x.detach().bfloat16().double().flatten(0, 1)
        assert module.weight.grad.dtype == torch.float32 and len(seen) == micro_batch + 1
        assert torch.equal(seen[-1], module.weight.grad)
    assert (module.weight.grad.double() - exact).abs().max().item() < 1e-5 * exact.abs().max().item()


def test_an_input_without_gradient_leaves_the_weight_gradient_to_autograd(monkeypatch):
    monkeypatch.setattr(main_grad, "fused_kernels", lambda device: True)
    module = main_grad.Linear(8, 6, bias=False)
    ComputeWeights(module, torch.bfloat16)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.float().sum().backward()
    want = torch.ones(5, 6, dtype=torch.bfloat16).t() @ x.bfloat16()  # autograd's bf16 gradient, widened
    assert torch.equal(module.weight.grad, want.float())


MLA = dict(style="llama", multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=10, qk_head_dim=6,
           qk_pos_emb_head_dim=4, v_head_dim=5)


@pytest.mark.parametrize("attention", ["mha", "mla"])  # gpt style (biases), llama style with MLA
def test_training_with_fused_linear_gradient_accumulation(tmp_path, monkeypatch, attention):
    """bf16 with compute copies and the fused path on (as on CUDA), dense and shared-expert MLPs included:
    every linear compute copy's master takes its gradient from its GEMM in every micro-batch, and the losses
    stay the unfused step's within bf16 rounding."""
    from moetrain.main_grad import Linear

    def config(name):
        cfg = _config(tmp_path, name, "bf16")
        cfg.moe.expert_interval, cfg.moe.num_shared_experts = 2, 1  # a dense layer, an MoE with a shared expert
        for key, value in (MLA if attention == "mla" else {}).items():
            setattr(cfg.model, key, value)
        return cfg

    _, unfused = _trained(config("unfused"), monkeypatch, copies=True)
    calls = []
    accumulated = main_grad.accumulated  # the experts' backward holds its own reference: linears' calls only

    def counted(master):
        calls.append(master)
        assert master.dtype == torch.float32 and master.grad.dtype == torch.float32
        accumulated(master)

    monkeypatch.setattr(main_grad, "fused_kernels", lambda device: True)
    monkeypatch.setattr(main_grad, "accumulated", counted)
    trainer, fused = _trained(config("fused"), monkeypatch, copies=True)
    masters = [module.weight for module, _ in gemm_weights(trainer.model) if isinstance(module, Linear)]
    projections = 5 if attention == "mla" else 2  # q_down, q_up, kv_down, kv_up, proj / qkv, proj
    assert len(masters) == 2 * projections + 2 + 2  # x 2 layers, the dense MLP, the shared expert
    assert len(calls) == 3 * 2 * len(masters)  # 3 steps x 2 micro-batches
    assert set(map(id, calls)) == set(map(id, masters))
    assert fused == pytest.approx(unfused, rel=1e-2) and fused != unfused
