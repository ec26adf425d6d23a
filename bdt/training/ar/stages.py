"""Progressive stages as one run: where the run is in its stage list, and one LR schedule for all.

A stage lasts `steps` optimizer steps, or until the real tokens it consumed (summed over ranks,
padding excluded) reach its `tokens`: a packed micro-batch holds fewer real tokens than its
budget, so a token stage's step count is only known as it runs. `StageClock` therefore tracks
the position (stage, the step it began at, its real tokens so far) instead of a fixed plan; the
trainer feeds it each step's global token count and asks it whether the stage is done.

The clock is also the LR scheduler's multiplier (schedule.ConfigLR): the optimizer's base LR is
1.0 and the multiplier is the absolute LR of the current stage's warmup + constant/cosine
schedule. A step stage runs that schedule over its steps; a token stage over its tokens, in units
of one full budget per step (token_budget x grad_accum x ranks), so `warmup_steps` of a token
stage means that many budgets of tokens. A stage switch needs no new scheduler. The per-rank
state holds `state_dict()` (the position only), which is what a resume restores; the stages are
the config's, so a resumed run may lengthen or shorten them.

`fit` shortens the current stage once (the time-limit fit, time_fit.py); the new limit is part
of the state, so a resumed run keeps the schedule the interrupted one chose.

A resume under changed stage lengths (`resume_at`): a current stage now shorter than what ran
ends at once (no step at its floor LR past the new end), and a finished run whose last stage is
now longer goes back into it, or with stages appended goes on to them (the finished clock keeps
the last stage's position for that; clocks saved before it did stay finished). Likewise a
checkpoint of the step that ended a stage (it holds that stage's stream) goes back into the stage
when the config lengthened it (the clock keeps the ended stage's position, `previous`): the same
edit then has the same effect whether the newest checkpoint is just before the switch or at it.
"""

from __future__ import annotations

import math

from bdt.training.schedule import WarmupSchedule
from bdt.training.ar.config import StageConfig


class StageClock:
    def __init__(self, stages: list[StageConfig], grad_accum: int, world_size: int):
        self.names = [s.name for s in stages]
        self.step_limits = [int(s.steps) for s in stages]  # 0 = a token stage
        self.token_limits = [int(s.tokens) for s in stages]
        # Tokens of one step at the full budget: the unit of a token stage's schedule.
        self.budget_per_step = [int(s.token_budget) * grad_accum * world_size for s in stages]
        self.specs = [[float(s.lr), int(s.warmup_steps), self._schedule_length(i),
                       str(s.schedule), float(s.min_lr_ratio)] for i, s in enumerate(stages)]
        for spec in self.specs:  # validate once, with the schedule's own error messages
            WarmupSchedule(spec[1], spec[2], spec[3], spec[4])
        self.stage, self.start_step, self.stage_tokens = 0, 0, 0
        self.fitted: dict | None = None  # {"stage", "steps", "tokens"}: a shortened stage's limits
        self.kept_last = True  # finished: start_step and stage_tokens are still the last stage's
        self.previous: list[int] | None = None  # [start_step, stage_tokens] of the stage before

    def _schedule_length(self, i: int) -> int:
        if self.step_limits[i] > 0:
            return self.step_limits[i]
        return max(1, math.ceil(self.token_limits[i] / self.budget_per_step[i]))

    @property
    def finished(self) -> bool:
        return self.stage >= len(self.names)

    def add_tokens(self, tokens: int) -> None:
        """Real tokens (all ranks) of the step that is about to be applied."""
        self.stage_tokens += int(tokens)

    def stage_done(self, steps_done: int) -> bool:
        """Whether the current stage is complete once `steps_done` global steps have run."""
        i = self.stage
        if self.step_limits[i] > 0:
            return steps_done - self.start_step >= self.step_limits[i]
        return self.stage_tokens >= self.token_limits[i]

    def advance(self, next_step: int) -> None:
        """The next stage begins at global step `next_step` (past the last one: finished, with
        the last stage's position kept)."""
        if self.stage + 1 < len(self.names):
            self.previous = [self.start_step, self.stage_tokens]
            self.stage, self.start_step, self.stage_tokens = self.stage + 1, next_step, 0
        else:
            self.stage += 1

    def resume_at(self, steps_done: int) -> None:
        """After load_state_dict, before the first step: apply the config's stage lengths to
        the restored position (module doc)."""
        if self.finished and self.kept_last:
            self.stage = len(self.names) - 1
        elif self.previous is not None and self.start_step == steps_done:
            self._back_into_previous(steps_done)
        while not self.finished and self.stage_done(steps_done):
            self.advance(steps_done)

    def _back_into_previous(self, steps_done: int) -> None:
        """Saved at the step that ended the previous stage: back into it if it is not done now."""
        here = self.stage, self.start_step, self.stage_tokens
        self.stage, (self.start_step, self.stage_tokens) = self.stage - 1, self.previous
        if self.stage_done(steps_done):
            self.stage, self.start_step, self.stage_tokens = here

    def fit(self, steps_done: int, steps_left: int) -> bool:
        """Shorten the current stage so that it ends `steps_left` (>= 1) steps after global step
        `steps_done`; its LR schedule then ends there, decay included. A token stage keeps its
        real tokens per step so far. Never lengthens a stage; returns whether it changed."""
        i, steps_left = self.stage, max(1, int(steps_left))
        ran = steps_done - self.start_step
        steps = ran + steps_left if self.step_limits[i] > 0 else 0
        tokens = 0 if steps else \
            self.stage_tokens + math.ceil(steps_left * self.stage_tokens / max(1, ran))
        if steps >= self.step_limits[i] and tokens >= self.token_limits[i]:
            return False
        self._apply_fit({"stage": i, "steps": steps, "tokens": tokens})
        return True

    def _apply_fit(self, fitted: dict) -> None:
        # A config resumed with a shorter stage than the fit keeps its own limit.
        i, steps, tokens = int(fitted["stage"]), int(fitted["steps"]), int(fitted["tokens"])
        if self.step_limits[i] > 0 and steps > 0:
            self.step_limits[i] = min(self.step_limits[i], steps)
        elif self.token_limits[i] > 0 and tokens > 0:
            self.token_limits[i] = min(self.token_limits[i], tokens)
        self.specs[i][2] = self._schedule_length(i)
        self.fitted = {"stage": i, "steps": self.step_limits[i], "tokens": self.token_limits[i]}

    def state_dict(self) -> dict:
        return {"stage": self.stage, "start_step": self.start_step,
                "stage_tokens": self.stage_tokens, "fitted": self.fitted,
                "kept_last": self.kept_last, "names": self.names[:self.stage + 1],
                "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["stage"] <= len(self.names):
            raise ValueError(f"checkpoint is in stage {state['stage']}, the config has only "
                             f"{len(self.names)} stages ({self.names})")
        # The stages trained so far are found by index: a stage inserted, removed or renamed
        # before the current one would resume into another stage's plan (same shards pass the
        # stream's check). Later stages may change; checkpoints before names were kept pass.
        trained = state.get("names", [])
        if trained != self.names[:len(trained)]:
            raise ValueError(f"checkpoint's stages so far are {trained}, the config's first "
                             f"{len(trained)} are {self.names[:len(trained)]}: stages trained "
                             f"already cannot be renamed, reordered, added or removed (change "
                             f"later ones, or start a new checkpoint.dir)")
        self.stage, self.start_step = int(state["stage"]), int(state["start_step"])
        self.stage_tokens = int(state["stage_tokens"])
        self.kept_last = bool(state.get("kept_last", False))
        self.previous = state.get("previous")  # absent in clocks saved before it was kept
        if self.kept_last and 0 < self.stage == len(trained):
            # Saved finished: the position is its last stage's, so resume there (resume_at ends
            # it again); a stage appended since then would have taken it for its own start.
            self.stage -= 1
        if state.get("fitted"):  # checkpoints from before the time fit have no such key
            if not 0 <= int(state["fitted"]["stage"]) < len(self.names):
                raise ValueError(f"checkpoint fitted stage {state['fitted']['stage']}, the config "
                                 f"has only {len(self.names)} stages ({self.names})")
            self._apply_fit(state["fitted"])

    def __call__(self, step: int) -> float:
        """Absolute LR of global step `step` (the scheduler asks after the previous step)."""
        i = min(self.stage, len(self.names) - 1)
        lr, warmup, length, kind, floor = self.specs[i]
        if self.step_limits[i] > 0:
            position: float = step - self.start_step
        else:
            position = self.stage_tokens / self.budget_per_step[i]
        return lr * WarmupSchedule(warmup, length, kind, floor)(position)
