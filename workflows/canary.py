"""Canary rollout and blue-green deployment. Reads top to bottom; each step is one line.

Canary:     preflight (window/freeze, stable healthy, image differs, no leftover canary) -> approvals (quorum of
            roles) -> create the canary (stable's spec, new image) and wait until ready -> for each weight: hold
            while the calendar is closed -> size the canary (ceil(weight x stable's replicas), ready) -> set the
            weight -> bake, looking at the figures and the HTTP checks every interval (a broken limit or a
            failed critical check rolls back at once) ->
            judge (Mann-Whitney against the stable baseline) -> pass: next weight / marginal or inconclusive:
            wait for a person (promote or abort) / fail: automatic rollback -> promote (stable gets the image,
            rollout status waited, weights 100/0, canary removed) -> notify.
Rollback:   the canary's weight to 0 first, then the canary removed; stable is never touched. An abort at any
            moment before the promotion does the same (the undo stack), so stable serves 100 %.
Blue-green: preflight -> approvals -> the other colour at full size with the new image, ready -> pre-promotion
            check -> switch the service -> post-promotion analysis through the rollback window (new colour
            after the switch against the old colour before it) -> scale the old colour down. A failure in
            the window, or `opsflow rollback`, switches back while the old colour is still there.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.procedure import A, Procedure, R, Request, StepDecl, Stop, Undo, failure_message

with workflow.unsafe.imports_passed_through():
    from opsflow.contracts.base import Activity
    from opsflow.contracts.rollout import (
        ANALYSIS_JUDGE,
        HTTP_CHECKS,
        K8S_CREATE_CANARY,
        K8S_CREATE_COLOUR,
        K8S_DELETE_CANARY,
        K8S_ROLLOUT_STATUS,
        K8S_SCALE_CANARY,
        K8S_SCALE_DEPLOYMENT,
        K8S_SET_IMAGE,
        K8S_SET_WEIGHT,
        K8S_SWITCH_SERVICE,
        PROMETHEUS_SAMPLES,
        ROUTER_SET_WEIGHT,
        ROUTER_STATUS,
    )
    from opsflow.models import ControlEvent
    from opsflow.rollout import (
        BASELINE_SUFFIX,
        ChecksRequest,
        DeploymentRequest,
        ImageRequest,
        JudgeRequest,
        MetricVerdict,
        RolloutApp,
        RolloutPolicy,
        RolloutState,
        RolloutTarget,
        RouterRef,
        RouterState,
        Samples,
        SamplesRequest,
        StepAnalysis,
        WeightRequest,
        closed_because,
        fresh_baseline_refusal,
        fresh_baseline_router_refusal,
        has_limits,
        limit_shortfall,
        threshold_breaches,
    )
    from opsflow.rollout_report import RolloutReport
    from opsflow.rules import ProcedureInput


class RolloutInput(ProcedureInput):
    image: str
    app: str | None = None
    strategy: str = "canary"  # canary | bluegreen
    steps: list[int] | None = None  # default: the inventory's
    bake: float | None = None  # seconds per weight; default: the inventory's
    auto_promote: bool = False  # without: a person promotes after the last analysed weight
    override: bool = False  # outside a window / in a freeze: ask an approver to override instead of refusing
    dry_run: bool = False
    requester: str
    reason: str = ""


def version_of(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[-1] if ":" in last else "latest"


class Rollout(Procedure[RolloutReport]):
    """What canary and blue-green share: preflight, approvals, analysis, the promote/rollback/override Updates."""

    notify_on_stop = False  # finalize() tells the channels, rolled back or not

    inp: RolloutInput
    policy: RolloutPolicy
    app: RolloutApp
    target: RolloutTarget
    queue: str
    workload_queue: str  # where the app's own activities (k8s.*, chosen by kind in activities/workloads.py) run

    strategy: str  # the procedure's name: canary | bluegreen

    def __init__(self, inp: RolloutInput) -> None:
        super().__init__(
            inp.inventory, RolloutReport.of(inp, image=inp.image, procedure=self.strategy, strategy=self.strategy)
        )
        self.inp = inp
        self.promote_request: ControlEvent | None = None
        self.promote_full = False
        self.rollback_request: ControlEvent | None = None
        self.deciding = False  # waiting for a person after a marginal/inconclusive judgement (or to promote)
        self.switched = False  # blue-green: the service points at the new colour
        self.calendar_hold = False  # the calendar is looked at during the run too (see hold())
        self.bake_check_failures: list[str] = []  # non-critical HTTP checks that failed in the current bake

    # -- preflight ---------------------------------------------------------------------------------------
    async def preflight(self) -> RolloutState:
        inp, inv, report = self.inp, self.inp.inventory, self.report
        if inv.rollout is None:
            raise Stop("refused", "the inventory has no rollout: section")
        self.policy = inv.rollout
        try:
            name, self.app = self.policy.app(inp.app)
        except ValueError as e:
            raise Stop("refused", str(e)) from None
        region = inv.regions.get(self.app.region)
        host = self.app.workload is not None  # the app runs on hosts (activities/workloads.py), not in a cluster
        if region is None or (region.kubernetes is None and not host):
            raise Stop(
                "refused", f"rollout.apps.{name}.region {self.app.region!r} is not a region with a kubernetes section"
            )
        if host and self.strategy != "canary":
            raise Stop("refused", f"rollout.apps.{name} runs on hosts (workload.kind host): canary only, no blue-green")
        if inp.strategy == "canary" and self.app.router is None:
            raise Stop("refused", f"rollout.apps.{name} has no router: a canary needs one (blue-green does not)")
        report.app, report.region, report.image = name, self.app.region, inp.image
        self.target = RolloutTarget(
            environment=inv.environment, region=self.app.region, kubernetes=region.kubernetes, app=self.app
        )
        if self.app.router is not None and self.app.router.kind == "traffic-manager":
            self.target.azure = inv.azure  # how the worker reaches ARM
        self.queue = inv.region_queue(self.app.region)
        self.workload_queue = self.app.workload_queue() or self.queue  # a host workload: the NGINX host's worker
        await self.calendar()
        # The queues its steps run on, the router's among them: one without a worker is named, before any change
        # (the router check would wait out its timeout); runs recorded before did not look (the kernel's patch)
        await self.check_workers([inv.task_queue, self.queue, self.workload_queue,
                                  getattr(self.app.router, "queue", None) or self.queue])
        state: RolloutState = await self.step(
            "preflight",
            f"Check {self.app.deployment} in {self.app.region}",
            K8S_ROLLOUT_STATUS,
            self.target,
            queue=self.workload_queue,
            detail=lambda s: f"stable {s.stable_image} {s.stable_ready}/{s.stable_desired}, weights {s.weights}",
        )
        self.calendar_hold = workflow.patched("rollout-calendar-hold")  # runs started before: calendar at start only
        return state

    async def calendar(self) -> None:
        """Refuse outside the deployment windows or in a freeze, unless an approver overrides with a reason."""
        why = closed_because(self.policy, workflow.now())
        if why is None:
            return
        if not self.inp.override:
            raise Stop(
                "refused",
                f"{why} (nothing changed; an approver may override: --override, then opsflow override ID --as NAME "
                "--reason WHY)",
            )
        record = self.begin_step("window", f"Override needed: {why}")
        policy = self.rollout_policy()
        self.report.status = "waiting"
        approvers = ", ".join(policy.names())
        self.report.waiting_for = (f"an override by an approver ({approvers}): "
                                   f"opsflow override {self.report.workflow_id} --as NAME --reason WHY")
        self.show()  # before the notification, as histories recorded before the kernel's override wait have it
        await self.notify(f"Override needed for a {self.inp.strategy} of {self.inp.image}: {why}", severity="warning")
        if (
            not await self.wait_for_override(self.report.waiting_for, timedelta(seconds=policy.timeout))
            and self.abort_requested is None
        ):
            self.end_step(record, "failed", "no override by the deadline")
            raise Stop("refused", f"{why}; no override within {policy.timeout:.0f}s")
        self.report.waiting_for = None
        if self.window_override is None:
            self.end_step(record, "failed", "aborted while waiting")
            await self.boundary()
        o = self.window_override
        assert o is not None
        self.end_step(record, "ok", f"overridden by {o.by}: {o.reason}")

    def closed_now(self) -> str | None:
        """Why the calendar is closed now, if the run looks at it (and nobody has overridden it)."""
        if not self.calendar_hold or self.window_override is not None:
            return None
        return closed_because(self.policy, workflow.now())

    async def hold(self, name: str, weight: int, canary: str, baseline: str, baseline_image: str) -> None:
        """A freeze that began, or a window that closed, during the run: no further step. The weight stays, the
        figures are still looked at every interval (a broken limit rolls back), until the calendar opens, an
        approver overrides (`opsflow override`, or `promote` with a reason) or someone aborts. `on_freeze:
        rollback` rolls back instead; a hold longer than `hold_max` rolls back too."""
        report, why = self.report, self.closed_now()
        if why is None:
            return
        if self.policy.on_freeze == "rollback":
            report.rollback_reason = f"{why} began during the rollout (on_freeze: rollback)"
            raise Stop("failed", f"rolled back: {report.rollback_reason}")
        await self.boundary()
        record = self.begin_step(name, f"Hold at {weight} %: {why}")
        wid = report.workflow_id
        report.held = f"at {weight} %: {why}"
        report.waiting_for = (f"the calendar to open ({why}); go on now: opsflow override {wid} --as NAME "
                              f"--reason WHY; stop: opsflow abort {wid} --as NAME")
        self.awaiting_override = True
        self.show()
        await self.notify(f"{report.procedure} of {self.inp.image} held at {weight} %: {why}", severity="warning")
        interval, start, checks = max(self.policy.analysis.interval, 1.0), workflow.now(), 0
        try:
            while True:
                try:
                    await workflow.wait_condition(lambda: self.window_override is not None or self.interrupting(),
                                                  timeout=timedelta(seconds=interval))
                except asyncio.TimeoutError:
                    pass
                held = (workflow.now() - start).total_seconds()
                if self.abort_requested is not None or self.rollback_request is not None:
                    self.end_step(record, "failed", f"aborted while held ({held:.0f}s)")
                    await self.stop_if_asked()
                who = self.window_override or self.promote_request
                if who is not None:
                    self.end_step(record, "ok", f"overridden by {who.by} after {held:.0f}s: {who.reason}")
                    return
                if self.closed_now() is None:
                    self.end_step(record, "ok",
                                  f"the calendar opened after {held:.0f}s; {checks} check(s), no limit broken")
                    return
                if held >= self.policy.hold_max:
                    self.end_step(record, "failed", f"held {held:.0f}s, longer than hold_max")
                    report.rollback_reason = f"held by the calendar ({why}) longer than {self.policy.hold_max:.0f}s"
                    raise Stop("failed", f"rolled back: {report.rollback_reason}")
                if weight > 0:  # traffic on the new version: its figures are still watched
                    checks += 1
                    await self.watch(record, weight, canary, baseline, baseline_image, start)
        finally:
            self.awaiting_override = False
            report.held = None
            report.waiting_for = None

    async def watch(self, record, weight: int, canary: str, baseline: str, baseline_image: str, start) -> None:
        """One look at the figures during a hold: a broken limit rolls back."""
        got = await self.samples(canary, baseline, start, workflow.now(), baseline_image)
        breaches, _ = self.limits(got)
        if breaches:
            result = StepAnalysis(weight=weight, kind="interval", verdict="fail", start=start, end=workflow.now(),
                                  canary_requests=got.canary_requests, baseline_requests=got.baseline_requests,
                                  metrics=breaches, reason="; ".join(f"{b.name}: {b.reason}" for b in breaches))
            self.report.analysis.append(result)
            self.end_step(record, "failed", result.reason)
            self.report.rollback_reason = self.failure_text(result)
            raise Stop("failed", f"rolled back automatically: {self.report.rollback_reason}")

    def rollout_policy(self):
        return self.policy.approval or self.inventory.approval

    def check_operator(self, req: Request, action: str) -> None:
        """The rollout's own approvers (`rollout.approval`) may promote, roll back, pause and abort it too."""
        self.check_rules_taken()
        policy = self.rollout_policy() if getattr(self, "policy", None) is not None else self.inventory.approval
        if req.by not in policy.names():
            return super().check_operator(req, action)
        self.verify_request(req, action, None, policy)

    async def approvals(self, what: str) -> None:
        await self.gate("approval", what, policy=self.rollout_policy())

    # -- analysis ----------------------------------------------------------------------------------------
    async def run_activity(self, activity: Activity[A, R], arg: A, timeout: float = 60) -> R:
        """An analysis activity inside a bake (not a step of its own): failures stop the procedure."""
        opts = self.activity_options(self.queue, timeout, None, 3)
        try:
            return await workflow.execute_activity(activity.name, arg, result_type=activity.result_type,
                                                   summary=activity.name, **opts)
        except ActivityError as err:
            raise Stop("failed", f"{activity.name}: {failure_message(err)}") from None

    async def samples(
        self, canary: str, baseline: str, start, end, baseline_version: str, baseline_window=None
    ) -> Samples:
        a = self.policy.analysis
        b_start, b_end = baseline_window or (None, None)
        req = SamplesRequest(
            analysis=a,
            canary=canary,
            baseline=baseline,
            canary_version=version_of(self.inp.image),
            baseline_version=version_of(baseline_version),
            start=start,
            end=end,
            baseline_start=b_start,
            baseline_end=b_end,
        )
        return await self.run_activity(PROMETHEUS_SAMPLES, req)

    async def bake(
        self,
        name: str,
        title: str,
        seconds: float,
        weight: int,
        canary: str,
        baseline: str,
        baseline_image: str,
        baseline_window=None,
    ) -> StepAnalysis | None:
        """Wait `seconds`, looking at the figures every interval (more often in the first one, first_look_cadence):
        a broken limit fails fast (returns that analysis). A `promote` ends the bake early (returns None, as does a
        bake with nothing wrong)."""
        await self.boundary()
        record = self.begin_step(name, title)
        self.bake_check_failures = []
        interval = max(self.policy.analysis.interval, 1.0)
        early = self.first_look_cadence()  # in the first interval after the weight moved: look sooner
        start = workflow.now()
        checks = short_looks = 0
        short: str | None = None
        checked = False  # the HTTP checks ran in the first interval (they run once there, then at every look)
        looked = start
        while True:
            elapsed = (workflow.now() - start).total_seconds()
            left = seconds - elapsed
            if left <= 0:
                break
            self.report.waiting_for = (
                f"{title}: {left:.0f}s left (opsflow promote {self.report.workflow_id} --as NAME skips it)"
                + (f"; limits: {short}" if short else "")
            )
            self.show()
            cadence = interval
            if early is not None and elapsed < interval:  # every `early` s from the last look's start, not its end
                cadence = max(early - (workflow.now() - looked).total_seconds(), 0.1)
            try:
                await workflow.wait_condition(self.interrupting, timeout=timedelta(seconds=min(cadence, left)))
            except asyncio.TimeoutError:
                pass
            if self.abort_requested is not None or self.rollback_request is not None:
                self.end_step(record, "failed", "aborted")
                await self.stop_if_asked()
            if self.promote_request is not None:
                self.end_step(record, "ok", f"ended early: promoted by {self.promote_request.by}")
                return None
            why = self.closed_now() if self.policy.on_freeze == "rollback" else None
            if why is not None:  # `hold` waits for the bake to end; `rollback` does not wait
                self.end_step(record, "failed", f"{why} (on_freeze: rollback)")
                self.report.rollback_reason = f"{why} began during the rollout (on_freeze: rollback)"
                raise Stop("failed", f"rolled back: {self.report.rollback_reason}")
            checks += 1
            looked = workflow.now()
            got = await self.samples(canary, baseline, start, looked, baseline_image, baseline_window)
            breaches, short = self.limits(got)
            short_looks += short is not None
            soon = early is not None and (workflow.now() - start).total_seconds() < interval
            if not (soon and (short is not None or checked)):  # not at every early look, nor with too little traffic
                breaches += await self.http_checks(weight)
                checked = True
            if breaches:
                result = StepAnalysis(
                    weight=weight,
                    kind="interval",
                    verdict="fail",
                    start=start,
                    end=workflow.now(),
                    canary_requests=got.canary_requests,
                    baseline_requests=got.baseline_requests,
                    metrics=breaches,
                    reason="; ".join(f"{b.name}: {b.reason}" for b in breaches),
                )
                self.report.analysis.append(result)
                self.end_step(record, "failed", result.reason)
                return result
        self.report.waiting_for = None
        failures = self.bake_check_failures
        self.end_step(record, "ok", f"{checks} check(s), no limit broken"
                      + (f" ({short_looks} with not enough traffic yet)" if short_looks else "")
                      + (f"; {len(failures)} non-critical HTTP check failure(s)" if failures else ""))
        return None

    def first_look_cadence(self) -> float | None:
        """Patch "first-look-sooner": seconds between the looks of a bake in its first interval, so a broken canary
        is caught as soon as Prometheus has traffic enough to judge, not one whole interval after the weight moved.
        Each look is gated by limit_min_requests (too few canary requests: no verdict), and goes on in the first
        interval after the first verdict too (a series that does not exist yet -- no 5xx so far -- may appear a
        scrape or two after the requests are counted). One query step (a look sooner than Prometheus' resolution
        sees nothing new), at least 1 s and a tenth of the interval: at most 10 extra looks a weight. The HTTP
        checks run at the first look with traffic enough, then every interval. None (every interval) for runs
        started before, and when the limits cannot count the canary's requests (no `analysis.requests`: a verdict
        on too little data) or there are no limits."""
        if not workflow.patched("first-look-sooner"):
            return None
        a = self.policy.analysis
        if a.requests is None or not has_limits(a):
            return None
        return max(a.step, a.interval / 10, 1.0)

    def limits(self, got: Samples) -> tuple[list[MetricVerdict], str | None]:
        """The absolute limits at one look: what they break, or why they may not judge yet (patch
        "limit-min-requests": fewer than `analysis.limit_min_requests` canary requests in the span judged;
        neither a pass nor a fail)."""
        latest = workflow.patched("limit-on-recent-samples")  # the last interval's samples, not the whole window
        short = limit_shortfall(self.policy.analysis, got) if workflow.patched("limit-min-requests") else None
        if short is not None:
            return [], short
        return threshold_breaches(self.policy.analysis, got, latest=latest), None

    async def http_checks(self, weight: int) -> list[MetricVerdict]:
        """The policy's HTTP checks at one look of a bake: a failed critical one is a breach (rolls back at once),
        a failed non-critical one is counted (the judgement of this bake is then marginal at best)."""
        if not self.policy.checks:
            return []
        bound = sum(c.timeout for c in self.policy.checks) + 10
        req = ChecksRequest(checks=self.policy.checks, app=self.app.deployment, image=self.inp.image, weight=weight)
        results = await self.run_activity(HTTP_CHECKS, req, timeout=bound)
        self.report.checks_run += len(results)
        self.report.check_failures += [r for r in results if not r.ok]
        self.bake_check_failures += [f"{r.name}: {r.reason}" for r in results if not r.ok and not r.critical]
        return [MetricVerdict(name=f"check {r.name}", verdict="breach", critical=True, reason=r.reason)
                for r in results if not r.ok and r.critical]

    def interrupting(self) -> bool:
        return self.abort_requested is not None or self.rollback_request is not None or self.promote_request is not None

    async def stop_if_asked(self) -> None:
        if self.rollback_request is not None and self.abort_requested is None:
            r = self.rollback_request
            raise Stop("aborted", f"rolled back by {r.by}" + (f": {r.reason}" if r.reason else ""))
        await self.boundary()

    async def judge(
        self, name: str, weight: int, canary: str, baseline: str, baseline_image: str, start, baseline_window=None
    ) -> StepAnalysis:
        await self.boundary()
        record = self.begin_step(name, f"Judge the canary at {weight} %")
        got = await self.samples(canary, baseline, start, workflow.now(), baseline_image, baseline_window)
        result: StepAnalysis = await self.run_activity(
            ANALYSIS_JUDGE, JudgeRequest(analysis=self.policy.analysis, samples=got, weight=weight)
        )
        if self.bake_check_failures and result.verdict == "pass":  # a person looks at what the checks saw
            result.verdict = "marginal"
            result.reason = (f"{len(self.bake_check_failures)} non-critical HTTP check failure(s) in the bake ("
                             + "; ".join(self.bake_check_failures[:3]) + f"); {result.reason}")
        self.report.analysis.append(result)
        self.end_step(
            record,
            "ok" if result.verdict == "pass" else "failed",
            f"{result.verdict} (score {result.score}): {result.reason}",
        )
        return result

    def failure_text(self, result: StepAnalysis) -> str:
        parts = []
        for m in result.failed_metrics():
            if m.canary is None and m.baseline is None:  # an HTTP check: no figures, its reason says it
                parts.append(f"{m.name} failed: {m.reason}")
                continue
            figures = f"canary {m.canary:.4g}" if m.canary is not None else "canary ?"
            figures += f" vs baseline {m.baseline:.4g}" if m.baseline is not None else ""
            parts.append(f"{m.name} {m.verdict}: {figures} ({m.reason})")
        return f"at {result.weight} %: " + ("; ".join(parts) or result.reason)

    async def decide(self, name: str, question: str) -> None:
        """Wait for a person: promote (go on) or abort/rollback (roll back). No answer by the deadline: roll back."""
        await self.boundary()
        record = self.begin_step(name, question)
        self.report.status = "waiting"
        wid = self.report.workflow_id
        self.report.waiting_for = (
            f"{question}: opsflow promote {wid} --as NAME [--full], or opsflow abort {wid} --as NAME"
        )
        self.deciding = True
        self.promote_request = None
        self.show()
        await self.notify(f"{self.report.procedure} of {self.inp.image} needs a person: {question}", severity="warning")
        timeout = self.rollout_policy().timeout
        try:
            await workflow.wait_condition(self.interrupting, timeout=timedelta(seconds=timeout))
        except asyncio.TimeoutError:
            self.deciding = False
            self.end_step(record, "failed", f"nobody decided within {timeout:.0f}s")
            raise Stop("failed", f"{question}: nobody decided within {timeout:.0f}s; rolled back") from None
        self.deciding = False
        self.report.waiting_for = None
        if self.promote_request is None:
            self.end_step(record, "failed", "aborted")
            await self.stop_if_asked()
        p = self.promote_request
        assert p is not None
        self.end_step(
            record,
            "ok",
            f"promoted by {p.by}" + (" (full)" if self.promote_full else "") + (f": {p.reason}" if p.reason else ""),
        )

    async def finalize(self) -> None:
        report = self.report
        if report.status not in ("succeeded", "planned") and any(s.outcome == "compensated" for s in report.steps):
            report.rolled_back = True
            report.rollback_reason = report.rollback_reason or report.failure
        if report.status != "planned":
            await self.notify(
                f"{report.procedure} of {report.image} on {report.app}: {report.status}"
                + (f" (rolled back: {report.rollback_reason})" if report.rolled_back else ""),
                severity="info" if report.status == "succeeded" else "warning",
            )

    # -- people ------------------------------------------------------------------------------------------
    @workflow.update
    def promote(self, req: Request) -> str:
        self.promote_request = self.event("promote-full" if req.full else "promote", req, signed_as="promote")
        self.promote_full = self.promote_full or req.full
        self.report.promoted_by.append(self.promote_request)
        if (self.report.current_step or "").startswith("hold"):
            self.report.overrides.append(self.promote_request)  # a promote during a hold sets the calendar aside
        return "promoting straight to 100 %" if req.full else "going on to the next step now"

    @promote.validator
    def _validate_promote(self, req: Request) -> None:
        self.check_operator(req, "promote")
        if self.point_of_no_return or self.report.status in ("succeeded", "failed", "aborted", "refused"):
            raise ApplicationError("nothing to promote: the rollout is past its steps", type="NotWaiting")
        steps = ("bake", "decide", "judge", "weight", "promote-gate", "post-analysis", "hold")
        if not (self.report.current_step or "").startswith(steps):
            raise ApplicationError(
                f"nothing to promote yet (current step: {self.report.current_step})", type="NotWaiting"
            )
        if (self.report.current_step or "").startswith("hold"):
            if req.by not in self.override_policy().names():
                raise ApplicationError(f"held by the calendar: only an approver may override it "
                                       f"({', '.join(self.override_policy().names())})", type="NotAllowed")
            if not req.reason.strip():
                raise ApplicationError("held by the calendar: a promote overrides it and needs a reason (--reason)",
                                       type="BadInput")

    @workflow.update
    def rollback(self, req: Request) -> str:
        self.rollback_request = self.event("rollback", req)
        return "rolling back: the previous version takes all traffic again"

    @rollback.validator
    def _validate_rollback(self, req: Request) -> None:
        self.check_operator(req, "rollback")
        if self.point_of_no_return:
            raise ApplicationError("past the rollback window: the old version is gone", type="NotAllowed")
        if self.rollback_request is not None or self.abort_requested is not None:
            raise ApplicationError("a rollback is already under way", type="NotAllowed")

    override_needs_reason = True

    def override_policy(self):
        return self.rollout_policy()

    def overridden(self, event: ControlEvent) -> str:
        self.report.overrides.append(event)
        return "overridden: the rollout goes on outside its window"


HOLD = "hold the weight while the calendar is closed (bake and analysis go on)"
HELD = "a freeze begins or the window closes during the run"


def router_name(app: RolloutApp) -> str:
    r = app.router
    if isinstance(r, RouterRef):
        return f"httproute {r.name}"
    if r is not None and r.kind == "nginx":
        return f"nginx upstream {r.upstream} ({r.upstream_file})"
    if r is not None and r.kind == "traffic-manager":
        return f"traffic manager {r.profile} ({r.stable_endpoint} / {r.canary_endpoint})"
    return "?"


def canary_plan(inp: RolloutInput, app: RolloutApp, steps: list[int], bake: float, stable_image: str | None,
                capacity: bool = False, calendar: bool = False, routers: bool = False,
                fresh: bool = False, scraped: bool = False) -> list[StepDecl]:
    baseline = f"{app.deployment}-baseline"
    host = app.workload is not None  # one instance per role on the host (activities/workloads.py)
    decls = [
        StepDecl("approval", "wait for the approvals (quorum)"),
        StepDecl(
            "create-canary",
            f"start {app.deployment}-canary on the host with {inp.image}; wait until its check says ready" if host
            else f"create {app.deployment}-canary ({app.canary_replicas} replica(s)) from {app.deployment} with "
            f"{inp.image}; wait until ready",
        ),
    ]
    if fresh:
        decls.append(StepDecl("create-baseline", f"create {baseline} from {app.deployment} with its image "
                              f"{stable_image}, as big as the canary; wait until ready"))
    for w in steps[:-1]:
        if calendar:
            decls.append(StepDecl(f"hold-{w}", HOLD, HELD))
        if capacity:
            decls.append(StepDecl(f"scale-{w}", f"check the canary's one instance is ready for {w} %" if host
                                  else f"size the canary for {w} %: ceil({w} % of stable's replicas), ready"))
        if capacity and fresh:
            decls.append(StepDecl(f"scale-baseline-{w}", f"size {baseline} as the canary, ready"))
        if scraped and w == steps[0]:
            decls.append(StepDecl("scraped", "wait until Prometheus counts the canary's requests (at most 2 "
                                  "intervals or 30 s), before any traffic reaches it"))
        share = f"{w} % to the canary and {w} % to {baseline}" if fresh else f"{w} % to the canary"
        decls += [
            StepDecl(f"weight-{w}", f"route {share} via {router_name(app)}"),
            StepDecl(f"bake-{w}", f"bake {bake:.0f}s, checking limits every interval"),
            StepDecl(f"judge-{w}", f"judge canary against {baseline if fresh else 'stable'} (Mann-Whitney)"),
            StepDecl(
                f"decide-{w}", "wait for a person to promote or abort", "the judgement is marginal or inconclusive"
            ),
        ]
    decls += [StepDecl("hold-promote", HOLD, HELD)] if calendar else []
    decls += [
        StepDecl("promote-gate", "wait for a person to promote", "no --auto-promote", not inp.auto_promote),
        StepDecl("promote", f"set {app.deployment} to {inp.image} (was {stable_image}); wait for rollout status"),
        *([StepDecl("route-stable", f"route 100 % to stable via {router_name(app)}")] if routers else []),
        *([StepDecl("remove-baseline", f"delete {baseline}")] if fresh else []),
        StepDecl("cleanup", f"route 100 % to {app.service}; delete the canary"),
        StepDecl("notify", "notify the channels"),
    ]
    return decls


@workflow.defn(name="canary")
class CanaryWorkflow(Rollout):
    strategy = "canary"

    @workflow.init
    def __init__(self, inp: RolloutInput) -> None:
        super().__init__(inp)

    @workflow.run
    async def run(self, inp: RolloutInput) -> RolloutReport:
        return await self.conclude(inp, self.canary)

    async def create(self, name: str, title: str, target: RolloutTarget, image: str, undo: str) -> None:
        """Create the canary (or the fresh baseline: `target` is then `<app>-baseline`) from stable's spec with
        `image`, and wait until it is ready; its removal is owed from here on."""
        await self.step(name, title, K8S_CREATE_CANARY, ImageRequest(target=target, image=image),
                        queue=self.workload_queue, timeout=self.policy.timeout, heartbeat=10, interruptible=True,
                        undo=Undo(K8S_DELETE_CANARY, undo, target),
                        detail=lambda s: f"{target.canary} ready {s.canary_ready}")

    async def scraped(self, canary: str, baseline: str, baseline_image: str) -> None:
        """Before the first weight: wait until Prometheus counts the canary's requests (`requests` has its series
        over the last interval), polling every step, at most 2 intervals or 30 s, whichever is longer (then on: the
        limits wait for traffic enough anyway). A counter's first scrape is no increase for rate(): requests served
        before it are lost to the figures, and the first looks would see no traffic for seconds (lab: up to 10 s)."""
        await self.boundary()
        a = self.policy.analysis
        record = self.begin_step("scraped", f"Wait until Prometheus scrapes {canary}", "wait")
        bound, every, start = max(2 * a.interval, 30.0), max(a.step, 1.0), workflow.now()
        while True:
            now = workflow.now()
            got = await self.samples(canary, baseline, now - timedelta(seconds=a.interval), now, baseline_image)
            waited = (workflow.now() - start).total_seconds()
            if got.canary_seen is not False:
                self.end_step(record, "ok", f"{canary}'s requests are counted (after {waited:.1f}s)")
                return
            if waited >= bound:
                self.end_step(record, "ok", f"{canary} not scraped within {bound:.0f}s; going on (no limit judges "
                              "before the canary served limit_min_requests)")
                return
            self.report.waiting_for = f"Prometheus to scrape {canary}, before any traffic reaches it"
            self.show()
            try:
                await workflow.wait_condition(self.interrupting, timeout=timedelta(seconds=every))
            except asyncio.TimeoutError:
                pass
            if self.abort_requested is not None or self.rollback_request is not None:
                self.end_step(record, "failed", "aborted")
                await self.stop_if_asked()

    async def size(self, name: str, title: str, target: RolloutTarget, weight: int) -> None:
        """Size the canary (or the fresh baseline) for `weight` (ceil(weight x stable's replicas)), ready."""
        stable = target.canary_suffix != BASELINE_SUFFIX  # the canary's detail names stable's size too
        await self.step(name, title, K8S_SCALE_CANARY, WeightRequest(target=target, canary_weight=weight),
                        queue=self.workload_queue, timeout=self.policy.timeout, heartbeat=10, interruptible=True,
                        detail=lambda s: f"{s.canary} {s.canary_replicas} replica(s)"
                        + (f", stable {s.stable_desired}" if stable else ""))

    async def canary(self, inp: RolloutInput) -> None:
        self.inp = inp
        inp, report = self.inp, self.report
        state = await self.preflight()
        steps = inp.steps or self.policy.steps
        steps = steps if steps[-1] == 100 else [*steps, 100]
        bake = inp.bake if inp.bake is not None else self.policy.bake
        report.weights, report.previous_image = steps, state.stable_image
        if not state.stable_done:
            raise Stop(
                "refused",
                f"stable {self.app.deployment} is not healthy ({state.stable_ready}/{state.stable_desired} ready)",
            )
        if state.stable_image == inp.image:
            raise Stop("refused", f"{self.app.deployment} already runs {inp.image}")
        if state.canary is not None:
            raise Stop(
                "refused",
                f"a canary is left over: {state.canary} ({state.canary_image}); remove it first (opsflow canary ... "
                "after kubectl delete)",
            )
        httproute = isinstance(self.app.router, RouterRef)
        if httproute and self.app.service not in state.weights:
            raise Stop("refused", f"{router_name(self.app)} sends nothing to service {self.app.service}")
        capacity = workflow.patched("canary-capacity")  # runs started before it never sized the canary
        # the router chosen by kind (router.* activities) and the fresh baseline; runs started before: k8s.set_weight
        routers = workflow.patched("rollout-routers")
        fresh = routers and self.policy.analysis.baseline == "fresh"
        if routers:
            report.router = self.app.router.kind if self.app.router else None
        t, rq = self.target, self.queue
        if routers:
            rq = getattr(self.app.router, "queue", None) or self.queue
            why = (fresh_baseline_refusal(steps) or fresh_baseline_router_refusal(self.app)) if fresh else None
            if why:
                raise Stop("refused", why)
        if routers and not httproute:  # the HTTPRoute's weights came with the preflight
            have: RouterState = await self.step(
                "router", f"Check {router_name(self.app)}", ROUTER_STATUS, t, queue=rq,
                detail=lambda s: f"{s.router}: {s.detail}")
            if have.weights.get("stable", 0) != 100:
                raise Stop("refused", f"{have.router} does not send 100 % to stable ({have.detail}): a canary or "
                           "baseline is left over, or the inventory's servers/endpoints are not the router's")
        # Prometheus scrapes the canary before it gets traffic (its first requests are not lost to rate()); runs
        # started before moved the weight at once and looked at the figures one interval later
        scraped = workflow.patched("first-look-sooner") and self.policy.analysis.requests is not None
        self.declare(canary_plan(inp, self.app, steps, bake, state.stable_image, capacity, self.calendar_hold,
                                 routers, fresh, scraped))
        if inp.dry_run:
            self.plan()
            return

        await self.approvals(
            f"canary of {inp.image} on {self.app.deployment} in {self.app.region} (now {state.stable_image})"
        )
        q = self.workload_queue
        await self.create("create-canary", f"Create the canary with {inp.image}", t, inp.image,
                          "Remove the canary (stable keeps 100 %)")
        stable, stable_image = self.app.deployment, state.stable_image or ""
        baseline, bt = stable, t.baseline_target()  # what the canary is judged against: stable, or a fresh copy
        if fresh:
            baseline = bt.canary
            report.baseline = baseline
            await self.create("create-baseline", f"Create {baseline} with {stable_image}", bt, stable_image,
                              f"Remove {baseline}")
        for w in steps[:-1]:
            await self.hold(f"hold-{w}", report.weight, t.canary, baseline, stable_image)  # no step while closed
            if self.promote_full:
                break
            self.promote_request = None
            if capacity:  # capacity before traffic: the canary can serve its share when the weight moves
                await self.size(f"scale-{w}", f"Size the canary for {w} %", t, w)
            if capacity and fresh:
                await self.size(f"scale-baseline-{w}", f"Size {baseline} as the canary", bt, w)
            if scraped and w == steps[0]:
                await self.scraped(t.canary, baseline, stable_image)
            if routers:
                await self.step(
                    f"weight-{w}",
                    f"Route {w} % to the canary" + (f" and {w} % to {baseline}" if fresh else ""),
                    ROUTER_SET_WEIGHT,
                    WeightRequest(target=t, canary_weight=w, baseline=fresh),
                    queue=rq,
                    undo=Undo(ROUTER_SET_WEIGHT, "Everything back to stable",
                              WeightRequest(target=t, canary_weight=0, baseline=fresh)),
                    detail=lambda s: s.detail,
                )
            else:
                await self.step(
                    f"weight-{w}",
                    f"Route {w} % to the canary",
                    K8S_SET_WEIGHT,
                    WeightRequest(target=t, canary_weight=w),
                    queue=q,
                    undo=Undo(K8S_SET_WEIGHT, "Canary weight back to 0", WeightRequest(target=t, canary_weight=0)),
                    detail=lambda s: ", ".join(f"{k}={v}" for k, v in s.weights.items()),
                )
            report.weight = w
            started = workflow.now()
            broken = await self.bake(f"bake-{w}", f"Bake at {w} %", bake, w, t.canary, baseline, stable_image)
            if broken is not None:
                report.rollback_reason = self.failure_text(broken)
                raise Stop("failed", f"rolled back automatically: {report.rollback_reason}")
            if self.promote_request is not None:
                continue  # a person promoted during the bake: no judgement for this weight
            result = await self.judge(f"judge-{w}", w, t.canary, baseline, stable_image, started)
            if result.verdict == "fail":
                report.rollback_reason = self.failure_text(result)
                raise Stop("failed", f"rolled back automatically: {report.rollback_reason}")
            if result.verdict in ("marginal", "inconclusive"):
                await self.decide(f"decide-{w}", f"the canary at {w} % is {result.verdict}")
        await self.hold("hold-promote", report.weight, t.canary, baseline, stable_image)
        if not inp.auto_promote and not self.promote_full and self.promote_request is None:
            await self.decide("promote-gate", f"promote {inp.image} to 100 %")

        # -- promotion: from here the new image is the stable one ------------------------------------------
        await self.boundary()
        self.point_of_no_return = True
        await self.step(
            "promote",
            f"Promote {inp.image} to {self.app.deployment}",
            K8S_SET_IMAGE,
            ImageRequest(target=t, image=inp.image),
            queue=q,
            timeout=self.policy.timeout,
            heartbeat=10,
            detail=lambda s: f"{s.stable_image} {s.stable_ready}/{s.stable_desired} ready",
        )
        if routers:
            await self.step("route-stable", "Route 100 % to stable", ROUTER_SET_WEIGHT,
                            WeightRequest(target=t, canary_weight=0, baseline=fresh), queue=rq,
                            detail=lambda s: s.detail)
        if fresh:
            await self.step("remove-baseline", f"Remove {baseline}", K8S_DELETE_CANARY, bt, queue=q,
                            detail=lambda s: f"{bt.canary} removed")
        await self.step(
            "cleanup",
            "Route 100 % to stable and remove the canary",
            K8S_DELETE_CANARY,
            t,
            queue=q,
            detail=lambda s: ", ".join(f"{k}={v}" for k, v in s.weights.items()),
        )
        report.weight = 0
        record = self.begin_step("notify", "Notify")
        self.end_step(record, "ok", f"{inp.image} promoted on {self.app.deployment}")


def bluegreen_plan(inp: RolloutInput, app: RolloutApp, active: str, other: str, window: float,
                   calendar: bool = False) -> list[StepDecl]:
    return [
        StepDecl("approval", "wait for the approvals (quorum)"),
        StepDecl("create-colour", f"run {other} with {inp.image} at {active}'s size beside it; wait until ready"),
        StepDecl("pre-analysis", f"check {other} is fully ready before any traffic"),
        *([StepDecl("hold-switch", "hold before the switch while the calendar is closed", HELD)] if calendar else []),
        StepDecl("switch", f"point service {app.service} at {other}"),
        StepDecl(
            "post-analysis",
            f"watch {other} for {window:.0f}s against {active}'s figures before the switch; switch back on failure",
        ),
        StepDecl(
            "switch-back",
            f"point service {app.service} back at {active}",
            "the post-promotion analysis fails or a person rolls back",
        ),
        StepDecl("scale-down", f"scale {active} to 0 after the rollback window"),
        StepDecl("notify", "notify the channels"),
    ]


@workflow.defn(name="bluegreen")
class BlueGreenWorkflow(Rollout):
    strategy = "bluegreen"

    @workflow.init
    def __init__(self, inp: RolloutInput) -> None:
        super().__init__(inp)

    @workflow.run
    async def run(self, inp: RolloutInput) -> RolloutReport:
        return await self.conclude(inp, self.bluegreen)

    async def bluegreen(self, inp: RolloutInput) -> None:
        self.inp = inp
        inp, report = self.inp, self.report
        state = await self.preflight()
        active = state.active or self.app.deployment
        other = self.app.deployment if active != self.app.deployment else f"{self.app.deployment}-green"
        previous = state.colours.get(active)
        report.previous_image, report.active = previous, active
        if previous == inp.image:
            raise Stop("refused", f"{active} already runs {inp.image}")
        window = self.policy.rollback_window
        self.declare(bluegreen_plan(inp, self.app, active, other, window, self.calendar_hold))
        if inp.dry_run:
            self.plan()
            return

        await self.approvals(
            f"blue-green of {inp.image} on {self.app.deployment} in {self.app.region} (now {previous} on {active})"
        )
        t, q = self.target, self.queue
        await self.step(
            "create-colour",
            f"Run {other} with {inp.image}",
            K8S_CREATE_COLOUR,
            ImageRequest(target=t, image=inp.image),
            queue=q,
            timeout=self.policy.timeout,
            heartbeat=10,
            interruptible=True,
            undo=Undo(
                K8S_SCALE_DEPLOYMENT, f"Scale {other} to 0", DeploymentRequest(target=t, deployment=other, replicas=0)
            ),
            detail=lambda s: f"{other} {s.replicas.get(other)} replicas with {s.colours.get(other)}",
        )
        pre: RolloutState = await self.step(
            "pre-analysis",
            f"Check {other} before the switch",
            K8S_ROLLOUT_STATUS,
            t,
            queue=q,
            detail=lambda s: f"{other} runs {s.colours.get(other)}",
        )
        if pre.colours.get(other) != inp.image:
            raise Stop("failed", f"{other} does not run {inp.image} (runs {pre.colours.get(other)})")
        await self.hold("hold-switch", 0, other, active, previous or "")  # no traffic moves while closed
        switched_at = workflow.now()
        await self.step(
            "switch",
            f"Switch {self.app.service} to {other}",
            K8S_SWITCH_SERVICE,
            DeploymentRequest(target=t, deployment=other),
            queue=q,
            undo=Undo(
                K8S_SWITCH_SERVICE,
                f"Switch {self.app.service} back to {active}",
                DeploymentRequest(target=t, deployment=active),
            ),
            detail=lambda s: f"serving: {s.active}",
        )
        report.active = other
        switched_at = workflow.now()
        baseline_window = (switched_at - timedelta(seconds=window), switched_at)
        broken = await self.bake(
            "post-analysis",
            f"Watch {other} for {window:.0f}s (rollback window)",
            window,
            100,
            other,
            active,
            previous or "",
            baseline_window,
        )
        if broken is None and self.promote_request is None:
            result = await self.judge("post-analysis", 100, other, active, previous or "", switched_at, baseline_window)
            if result.verdict == "fail":
                broken = result
        if broken is not None:
            report.rollback_reason = self.failure_text(broken)
            report.active = active
            raise Stop("failed", f"switched back automatically: {report.rollback_reason}")
        await self.boundary()
        if self.rollback_request is not None:
            await self.stop_if_asked()
        self.point_of_no_return = True
        await self.step(
            "scale-down",
            f"Scale {active} down",
            K8S_SCALE_DEPLOYMENT,
            DeploymentRequest(target=t, deployment=active, replicas=0),
            queue=q,
            timeout=self.policy.timeout,
        )
        record = self.begin_step("notify", "Notify")
        self.end_step(record, "ok", f"{inp.image} serves from {other}; {active} scaled down")
