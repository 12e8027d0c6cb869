"""megatron-core's DistributedOptimizer without CUDA, TE or apex.

Installed by `dsv4cli.compat.activate()` without CUDA; each `patch_*` function is one record of
`dsv4cli.compat.megatron_patches.PATCHES`.

It sorts model params by `Tensor.type()` == 'torch.cuda.FloatTensor' (-> `patch_distopt_param_groups`).
Without TE/apex FusedAdam megatron uses torch's Adam, which creates its per-parameter state
(exp_avg, exp_avg_sq and a 0-dim "step" tensor) lazily at the first step. The distributed
optimizer's checkpoint code assumes FusedAdam (step in the param groups), so on CPU
(-> `patch_distopt_torch_adam`):
- a fresh optimizer asked for its sharded state (before a load) failed: `state_dict()` asserts
  exactly one step over the (empty) per-parameter state -> the state is created first;
- `_set_main_param_and_optimizer_states` copied every state key from the checkpoint, which has
  no "step" -> the step is left out of that copy;
- `load_state_dict` gave every parameter ONE shared step tensor; Adam increments it in place once
  per parameter, so after a resume the bias correction ran ahead and training did not resume
  exactly -> each parameter gets its own copy.
"""

from __future__ import annotations


def patch_distopt_param_groups() -> None:
    """DistributedOptimizer._build_model_and_main_param_groups (param sort by CUDA type name) runs in cuda_as_cpu()."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    from dsv4cli.compat.cpu import in_cuda_as_cpu

    build = DO.__dict__["_build_model_and_main_param_groups"].__func__
    DO._build_model_and_main_param_groups = classmethod(in_cuda_as_cpu(build))


def patch_distopt_torch_adam() -> None:
    """The distributed optimizer's checkpoints with torch's Adam (no TE/apex FusedAdam): the state Adam
    creates lazily, its per-parameter "step", one step tensor per parameter after a load."""
    import torch
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    state_dict = DO.state_dict

    def state_dict_with_adam_state(self):
        # torch Adam creates its per-parameter state at the first step; megatron's state_dict()
        # asserts exactly one "step" over it (a fresh optimizer asked for its sharded state
        # before a load has none). Create the state Adam would: zero moments, step 0.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state_dict(self)

    DO.state_dict = state_dict_with_adam_state

    set_states = DO._set_main_param_and_optimizer_states

    def set_states_but_step(self, model_param, tensors):
        # megatron copies every key of the parameter's Adam state from `tensors`, which never
        # hold torch Adam's per-parameter "step" (it comes from the param groups).
        group_index, group_order = self.model_param_group_index_map[model_param]
        st = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = st.pop("step", None)
        try:
            set_states(self, model_param, tensors)
        finally:
            if step is not None:
                st["step"] = step

    DO._set_main_param_and_optimizer_states = set_states_but_step

    load_state_dict = DO.load_state_dict

    def load_state_dict_own_steps(self, state_dict):
        # megatron gives every parameter the SAME "step" tensor; Adam increments it in place once
        # per parameter, so after a resume the bias correction ran ahead (resumed NOT exactly).
        load_state_dict(self, state_dict)
        for st in self.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()

    DO.load_state_dict = load_state_dict_own_steps
