"""AdamW over stacked parameters: k members' weights along the leading axis, each member with its
own step count (members of a fused group may have started from checkpoints of different steps).

The update is torch.optim.AdamW's (weight decay 0, as the Trainer uses it) in the same order of
operations, so a member's weights follow the path they follow under torch's optimizer alone. The
moment updates are elementwise and need no member axis; only the bias corrections differ per
member and are broadcast along it. `member_state` / `load_member_state` speak torch.optim.AdamW's
own state-dict format, so a member's checkpoint is that of an unfused trial.
"""

import torch


class StackedAdamW:
    def __init__(self, params: list[torch.nn.Parameter], members: int, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps = [0] * members                                   # per member
        self.exp_avg = [torch.zeros_like(p) for p in params]         # [k, ...] each
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        exp_avg = [m for m, p in zip(self.exp_avg, self.params) if p.grad is not None]
        exp_avg_sq = [v for v, p in zip(self.exp_avg_sq, self.params) if p.grad is not None]
        self.steps = [s + 1 for s in self.steps]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        # bias corrections in double on the host, as torch computes them from a float step
        step_size = [-self.lr / (1 - beta1 ** s) for s in self.steps]
        bc2_sqrt = [(1 - beta2 ** s) ** 0.5 for s in self.steps]
        device = params[0].device if params else "cpu"
        step_size_t = torch.tensor(step_size, dtype=torch.float32, device=device)
        bc2_sqrt_t = torch.tensor(bc2_sqrt, dtype=torch.float32, device=device)
        for p, m, v in zip(params, exp_avg, exp_avg_sq):
            shape = (-1,) + (1,) * (p.dim() - 1)                    # broadcast along members
            denom = (v.sqrt() / bc2_sqrt_t.view(shape)).add_(self.eps)
            p.add_(m.mul(step_size_t.view(shape).to(m.dtype)).div_(denom))  # addcdiv's order

    def member_state(self, index: int, template: dict) -> dict:
        """Member `index`'s state in torch.optim.AdamW's format; `template` is the param_groups
        entry of an AdamW over the member's parameters (hyperparameters and parameter ids)."""
        state = {}
        if self.steps[index]:
            state = {i: {"step": torch.tensor(float(self.steps[index])),
                         "exp_avg": m[index].detach().clone(),
                         "exp_avg_sq": v[index].detach().clone()}
                     for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq))}
        return {"state": state, "param_groups": [template]}

    @torch.no_grad()
    def load_member_state(self, index: int, state_dict: dict) -> None:
        state = state_dict["state"]
        if not state:  # saved before its first step
            self.steps[index] = 0
            return
        steps = {int(s["step"]) for s in state.values()}
        if len(steps) != 1 or len(state) != len(self.params):
            raise ValueError("optimizer state does not fit this model (parameters or steps differ)")
        self.steps[index] = steps.pop()
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            m[index].copy_(state[i]["exp_avg"])
            v[index].copy_(state[i]["exp_avg_sq"])

    def keep_members(self, keep: list[int], params: list[torch.nn.Parameter]) -> None:
        """After models.fused.keep_members: the remaining members' state, on the new parameters."""
        index = torch.tensor(keep, device=params[0].device)
        self.params = params
        self.exp_avg = [m.index_select(0, index) for m in self.exp_avg]
        self.exp_avg_sq = [v.index_select(0, index) for v in self.exp_avg_sq]
        self.steps = [self.steps[i] for i in keep]
