"""Several models of one architecture trained as one (horizontal fusion, as in HFTA).

k models of the same preset and layout differ only in their weights. `fuse` deep-copies the
first and replaces each of its Linear, Conv2d and GroupNorm layers by a stacked layer that holds
the k members' weights along a new leading axis and computes all members in one batched op:

    fused = fuse([model_a, model_b])      # parameters [k, ...], same names as a member's
    out = fused(x, t)                     # x [k*B, C, H, W]: member m owns rows m*B..(m+1)*B-1

Everything between those layers (LayerNorm without affine, attention, SiLU/GELU, positions,
patchify/unpatchify) runs on the member-major batch of k*B samples unchanged: attention folds
the member axis into its batch, so SDPA, NATTEN and the tiled path are the ones a single model
uses. No op mixes two members, so each member's outputs and gradients are those it would have
alone (equal up to float rounding of the batched kernels). Shared modules (weight sharing)
stay shared; buffers (positions, PCA components) are the members' own, which must be equal.

`member_state_dict` / `load_member_state_dict` convert between the fused model and one member's
ordinary state dict, so a member's checkpoint is the checkpoint of an unfused trial.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class StackedLinear(nn.Module):
    """k Linear layers: weight [k, out, in], bias [k, out]; input [k*B, ..., in]."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        has_bias = layers[0].bias is not None
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers])) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        rows = x.reshape(k, -1, x.shape[-1])                          # [k, B*..., in]
        if self.bias is None:
            out = torch.bmm(rows, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), rows, self.weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1])              # [k*B, ..., out]


def _to_channels(x: torch.Tensor, k: int) -> torch.Tensor:
    """[k*B, C, H, W] -> [B, k*C, H, W]: the members side by side as channel groups."""
    kb, c, h, w = x.shape
    return x.reshape(k, kb // k, c, h, w).transpose(0, 1).reshape(kb // k, k * c, h, w)


def _from_channels(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k*C, H, W] -> [k*B, C, H, W]."""
    b, kc, h, w = x.shape
    return x.reshape(b, k, kc // k, h, w).transpose(0, 1).reshape(k * b, kc // k, h, w)


class StackedConv2d(nn.Module):
    """k Conv2d layers as one grouped convolution over the members' channels."""

    def __init__(self, layers: list[nn.Conv2d]):
        super().__init__()
        first = layers[0]
        assert first.padding_mode == "zeros", "only zero-padded convolutions can be fused"
        self.stride, self.padding, self.dilation, self.groups = (first.stride, first.padding,
                                                                 first.dilation, first.groups)
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        has_bias = first.bias is not None
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers])) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        weight = self.weight.reshape(-1, *self.weight.shape[2:])     # [k*out, in/groups, kh, kw]
        bias = None if self.bias is None else self.bias.reshape(-1)
        out = F.conv2d(_to_channels(x, k), weight, bias, self.stride, self.padding, self.dilation,
                       self.groups * k)
        return _from_channels(out, k)


class StackedGroupNorm(nn.Module):
    """k GroupNorm layers as one GroupNorm with k times the groups (a group never spans members)."""

    def __init__(self, layers: list[nn.GroupNorm]):
        super().__init__()
        first = layers[0]
        assert first.affine, "GroupNorm without affine parameters needs no fusing"
        self.num_groups, self.eps = first.num_groups, first.eps
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        out = F.group_norm(_to_channels(x, k), self.num_groups * k, self.weight.reshape(-1),
                           self.bias.reshape(-1), self.eps)
        return _from_channels(out, k)


STACKED = {nn.Linear: StackedLinear, nn.Conv2d: StackedConv2d, nn.GroupNorm: StackedGroupNorm}


def fuse(models: list[nn.Module]) -> nn.Module:
    """One module computing all `models` (same architecture) on a member-major batch."""
    if len({type(m) for m in models}) != 1:
        raise ValueError("only models of one architecture can be fused")
    fused = copy.deepcopy(models[0])
    replaced: dict[int, nn.Module] = {}  # a shared layer is stacked once and stays shared
    for name, module in list(fused.named_modules(remove_duplicate=False)):
        kind = STACKED.get(type(module))
        if kind is None:
            continue
        if id(module) not in replaced:
            replaced[id(module)] = kind([m.get_submodule(name) for m in models])
        parent, _, attr = name.rpartition(".")
        setattr(fused.get_submodule(parent) if parent else fused, attr, replaced[id(module)])
    stacked = {id(p) for layer in replaced.values() for p in layer.parameters()}
    loose = [n for n, p in fused.named_parameters() if id(p) not in stacked]
    if loose:
        raise ValueError(f"cannot fuse {type(models[0]).__name__}: parameters outside Linear, Conv2d "
                         f"and GroupNorm layers: {', '.join(loose[:5])}")
    for name, buffer in fused.named_buffers():
        for m in models[1:]:
            if not torch.equal(buffer, m.get_buffer(name)):
                raise ValueError(f"cannot fuse models whose buffer {name} differs")
    fused.num_members = len(models)
    return fused


def member_state_dict(fused: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Member `index`'s weights as the state dict of an unfused model (copies)."""
    params = dict(fused.named_parameters(remove_duplicate=False))
    return {name: (value[index] if name in params else value).detach().clone()
            for name, value in fused.state_dict().items()}


@torch.no_grad()
def load_member_state_dict(fused: nn.Module, index: int, state: dict[str, torch.Tensor]) -> None:
    """Put an unfused model's state dict into member `index` (buffers must match)."""
    params = dict(fused.named_parameters(remove_duplicate=False))
    for name, value in fused.state_dict().items():
        if name not in state:
            raise KeyError(f"member state dict lacks {name}")
        if name in params:
            params[name][index].copy_(state[name])
        elif not torch.equal(value, state[name].to(value.device)):
            raise ValueError(f"member state dict has another {name} than the fused model")


@torch.no_grad()
def keep_members(fused: nn.Module, keep: list[int]) -> None:
    """Drop every member not in `keep` (indices into the current members, in their order)."""
    index = torch.tensor(keep, device=next(fused.parameters()).device)
    for module in fused.modules():
        if isinstance(module, tuple(STACKED.values())):
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(p.index_select(0, index), requires_grad=p.requires_grad))
    fused.num_members = len(keep)
