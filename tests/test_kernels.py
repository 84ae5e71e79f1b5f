"""Triton mask kernels vs the torch reference, forward and backward, fp32 and bf16.

On CPU the kernels run under TRITON_INTERPRET=1 in a child process: triton reads the flag when the
kernels are defined, so setting it in this process would leak into every later triton import of the
test session. The parent makes fresh random inputs (seed printed on failure), the child (this file run
as a script) runs the Triton ops on them, and the parent compares with the reference.

The expected values are the reference op evaluated in fp64 on the same inputs and rounded once to the
input dtype. The kernel computes in fp32 and rounds once, so in bf16 the two differ by at most one
rounding (< 0.8%, inside rtol 1e-2), where the eager bf16 reference rounds after every op and can drift
past 1e-2 near binade edges. In fp32, torch's own GELU-tanh backward loses digits to the cancellation in
1 + tanh(z) for negative inputs (errors ~4e-6 where the kernel, using sigmoid(2z), stays within 1e-6).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnscale.kernels import ACTIVATIONS, act_mask, gated_act_mul_mask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "bfloat16": dict(rtol=1e-2, atol=1e-2)}
CASES = [(op, act, dtype) for op in ("gated", "plain") for act in ACTIVATIONS for dtype in DTYPES]


def make_inputs(seed: int, rows=(3, 37), width=100) -> dict:
    """Odd shapes (partial tiles), gates over the saturating range, a mask with zeros and a 0.5."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for op, act, dtype in CASES:
        shape = (*rows, width)
        x = torch.randn(shape, generator=g) * 4
        x.view(-1)[:8] = torch.tensor([-30.0, -12.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0])
        mask = (torch.rand(width, generator=g) > 0.3).float()
        mask[1] = 0.5
        case = {"x": x.to(DTYPES[dtype]), "mask": mask, "dy": torch.randn(shape, generator=g).to(DTYPES[dtype])}
        if op == "gated":
            case["up"] = torch.randn(shape, generator=g).to(DTYPES[dtype])
        inputs[(op, act, dtype)] = case
    return inputs


def run_op(case: dict, op: str, act: str, fn) -> dict:
    """Forward + backward of `fn` (triton or reference op) on leaf copies of the inputs."""
    x = case["x"].detach().clone().requires_grad_()
    if op == "gated":
        up = case["up"].detach().clone().requires_grad_()
        y = fn["gated"](x, up, case["mask"].to(x.device), act)
        y.backward(case["dy"])
        return {"y": y.detach(), "dx": x.grad, "dup": up.grad}
    y = fn["plain"](x, case["mask"].to(x.device), act)
    y.backward(case["dy"])
    return {"y": y.detach(), "dx": x.grad}


REFERENCE = {"gated": gated_act_mul_mask, "plain": act_mask}


def expected(case: dict, op: str, act: str, dtype: str) -> dict:
    """The reference op in fp64 math on the case's values, rounded once to the case dtype."""
    as64 = {k: v.double() for k, v in case.items()}
    return {k: v.to(DTYPES[dtype]) for k, v in run_op(as64, op, act, REFERENCE).items()}


def compare(got: dict, want: dict, dtype: str, label: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, f"{label} {name}"
        torch.testing.assert_close(
            got[name].cpu(), want[name].cpu(), **TOL[dtype], msg=lambda m, name=name: f"{label}: {name}\n{m}"
        )


# -- CPU: interpreted in a child process ----------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    seed = int.from_bytes(os.urandom(4), "little")
    inputs = make_inputs(seed)
    folder = tmp_path_factory.mktemp("triton_interpret")
    torch.save(inputs, folder / "inputs.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreted kernels failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return seed, inputs, torch.load(folder / "outputs.pt")


@pytest.mark.parametrize("op, act, dtype", CASES)
def test_triton_matches_reference_interpreted(interpreted, op, act, dtype):
    seed, inputs, outputs = interpreted
    case = inputs[(op, act, dtype)]
    compare(outputs["ops"][(op, act, dtype)], expected(case, op, act, dtype), dtype, f"seed {seed} {op} {act} {dtype}")
    masked = case["mask"] == 0
    assert not outputs["ops"][(op, act, dtype)]["y"][..., masked].any()  # masked columns exactly zero


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_apply_masks_triton_path_matches_hook_path(interpreted, arch):
    """The patched MLP forward (fused kernel) gives the loss and gradients of the pre-hook path (fp32)."""
    seed, _, outputs = interpreted
    result = outputs["models"][arch]
    assert set(result["triton"]["paths"].values()) == {"triton"}
    assert set(result["torch"]["paths"].values()) == {"hook"}
    torch.testing.assert_close(result["triton"]["loss"], result["torch"]["loss"], rtol=1e-5, atol=1e-6)
    for name, grad in result["torch"]["grads"].items():
        torch.testing.assert_close(result["triton"]["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert result["restored"]


def test_importing_kernels_does_not_import_triton():
    code = "import sys, fnscale.kernels as k; assert 'triton' not in sys.modules; print(k.ACTIVATIONS)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- GPU: compiled kernels -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_reference_cuda():
    from fnscale import kernels

    fn = {"gated": kernels.triton_gated_act_mul_mask, "plain": kernels.triton_act_mask}
    seed = int.from_bytes(os.urandom(4), "little")
    for key, case in make_inputs(seed, rows=(4, 1000), width=5504).items():
        case = {k: v.cuda() for k, v in case.items()}
        compare(run_op(case, key[0], key[1], fn), expected(case, *key), key[2], f"seed {seed} {key}")


# -- child process ---------------------------------------------------------------------------------


def _model_check(arch: str) -> dict:
    from test_masking import BUILD, WIDTH, batch, loss_of

    from fnscale.masking import apply_masks, build_masks

    ids, result = batch(), {}
    masks = build_masks({0: [0, 3, 9, 20], 1: [7]}, "lesion", 2, WIDTH[arch])
    for kernel in ("triton", "torch"):
        model = BUILD[arch]()
        handle = apply_masks(model, masks, kernel=kernel)
        loss = loss_of(model, ids)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        result[kernel] = {"paths": dict(handle.paths), "loss": loss.detach(), "grads": grads}
        handle.remove()
        if kernel == "triton":
            model.zero_grad()
            result["restored"] = torch.equal(model(ids).logits, BUILD[arch]()(ids).logits)
    return result


def _child(folder: Path) -> None:
    from fnscale import kernels

    assert kernels.interpret_mode() and kernels.triton_available()
    fn = {"gated": kernels.triton_gated_act_mul_mask, "plain": kernels.triton_act_mask}
    inputs = torch.load(folder / "inputs.pt")
    ops = {key: run_op(case, key[0], key[1], fn) for key, case in inputs.items()}
    models = {arch: _model_check(arch) for arch in ("llama", "gpt2")}
    torch.save({"ops": ops, "models": models}, folder / "outputs.pt")


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
