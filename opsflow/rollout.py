"""Rollouts (canary, blue-green): the inventory's `rollout:` section, activity inputs/outputs, the report.

Plain pydantic models, no I/O: they travel in workflow inputs and history. The statistics live in
`opsflow/judge.py` (scipy, activities only).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from opsflow.calendar import Calendar, Freeze, FreezeCalendar, NeverOpens, WeeklyWindow
from opsflow.sections import (
    ApprovalPolicy,
    AzureConnection,
    KubernetesConfig,
    LateFields,
    Seconds,
    Strict,
    parse_duration,
)

Direction = Literal["increase", "decrease", "either"]
Missing = Literal["zero", "skip", "inconclusive"]
BASELINE_SUFFIX = "-baseline"


# -- the inventory's `rollout:` section ----------------------------------------------------------------------


class RouterRef(Strict):
    """What splits traffic between stable and canary: a Gateway API HTTPRoute whose backendRefs carry weights
    (the default kind)."""

    kind: Literal["httproute"] = "httproute"
    name: str


class NginxRouter(Strict):
    """Plain NGINX in front of services outside Kubernetes: opsflow owns `upstream_file` (it holds the one upstream
    block; nginx.conf includes it), writes it on the host through the worker of `queue`, runs `test` (nginx -t) and
    then `reload`. A role's weight becomes the `weight=` of its servers; 0 % marks them `down`."""

    kind: Literal["nginx"]
    upstream_file: str = Field(description="absolute path of the file that holds the upstream block, on the host")
    upstream: str = Field(description="the upstream's name (proxy_pass http://NAME)")
    servers: dict[Literal["stable", "canary", "baseline"], list[str]] = Field(
        description="host:port of the servers of each role: stable, canary (and baseline for analysis.baseline: fresh)"
    )
    test: list[str] = Field(default=["nginx", "-t"], min_length=1, description="checks the config before a reload")
    reload: list[str] = Field(default=["nginx", "-s", "reload"], min_length=1,
                              description="e.g. [docker, exec, nginx-lb, nginx, -s, reload]")
    queue: str | None = Field(default=None, description="the task queue of the worker on the NGINX host; default: "
                              "the app's region queue")
    timeout: Seconds = Field(default=30, gt=0, le=300, description="bound on the test and the reload commands")

    _d = field_validator("timeout", mode="before")(parse_duration)

    @model_validator(mode="after")
    def _roles(self) -> "NginxRouter":
        if not self.upstream_file.startswith("/"):
            raise ValueError(f"upstream_file {self.upstream_file!r} must be an absolute path")
        for role in ("stable", "canary"):
            if not self.servers.get(role):
                raise ValueError(f"servers.{role} names no server (host:port)")
        seen: dict[str, str] = {}
        for role, addrs in self.servers.items():
            for a in addrs:
                if a in seen:
                    raise ValueError(f"server {a} is in servers.{seen[a]} and servers.{role}")
                seen[a] = role
        return self


class TrafficManagerRouter(Strict):
    """Azure Traffic Manager, weighted routing, for a region-level canary: the canary's share is the weight of
    `canary_endpoint` against `stable_endpoint` (weights 1..1000; 0 % disables the endpoint)."""

    kind: Literal["traffic-manager"]
    subscription_id: str
    resource_group: str
    profile: str
    stable_endpoint: str
    canary_endpoint: str
    endpoint_type: Literal["ExternalEndpoints", "AzureEndpoints", "NestedEndpoints"] = "ExternalEndpoints"
    queue: str | None = Field(default=None, description="default: the app's region queue")


def _router_kind(v) -> str:
    return (v.get("kind") or "httproute") if isinstance(v, dict) else getattr(v, "kind", "httproute")


Router = Annotated[
    Annotated[RouterRef, Tag("httproute")] | Annotated[NginxRouter, Tag("nginx")]
    | Annotated[TrafficManagerRouter, Tag("traffic-manager")],
    Discriminator(_router_kind, custom_error_type="router_kind",
                  custom_error_message="router.kind is one of httproute, nginx, traffic-manager"),
]


_HOST_ARG = r"^[A-Za-z0-9_./@%+=:,{}-]+$"  # nothing a remote shell would split or expand ({...}: filled in)
HOST_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:@-]*$")  # an image reference a command may carry to the host
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
HOST_ROLES = ("stable", "canary", "baseline")


class HostWorkload(Strict):
    """The app outside Kubernetes (`workload.kind: host`): one instance per role (stable, canary, a fresh baseline)
    on a host, e.g. a Compose service or a systemd unit, behind the nginx router (`router.servers` has each role's
    address). The worker runs `start`, `check` and `stop` through `run` (a prefix such as ssh; [] runs them on the
    worker's own host), as `database.host.run` does for self-managed PostgreSQL; every argument is checked so a
    remote shell splits nothing, and each command is bounded by `timeout`. In the arguments {role} (stable, canary,
    baseline), {name} (web, web-canary, web-baseline), {image} and {version} (the image's tag) are filled in."""

    kind: Literal["host"]
    run: list[str] = Field(default=[], description="the command prefix that reaches the host, e.g. [ssh, -o, "
                           "BatchMode=yes, deploy@web1]; [] runs on the worker's host")
    start: list[str] = Field(min_length=1, description="starts (or replaces) {role}'s instance with {image}/{version}; "
                             "e.g. [systemctl, start, shop@{role}:{version}]")
    check: list[str] = Field(min_length=1, description="exit 0 printing the image {role}'s instance serves when it is "
                             "up and ready; exit 3 when it does not run; anything else: not ready")
    stop: list[str] = Field(min_length=1, description="stops {role}'s instance; stopping a stopped one succeeds")
    timeout: Seconds = Field(default=120, gt=0, le=3600,
                             description="bound of one command, and of the wait until an instance is ready")
    queue: str | None = Field(default=None, description="the task queue of the worker that runs the commands; "
                              "default: the router's queue, else the app's region queue")

    _d = field_validator("timeout", mode="before")(parse_duration)

    @model_validator(mode="after")
    def _arguments(self) -> "HostWorkload":
        for field in ("run", "start", "check", "stop"):
            for arg in getattr(self, field):
                if not re.match(_HOST_ARG, arg):
                    raise ValueError(f"{field}: argument {arg!r} has characters a remote shell would split or expand")
                allowed = {"role", "name", "image", "version"} if field == "start" else set() if field == "run" \
                    else {"role", "name"}
                unknown = [p for p in _PLACEHOLDER.findall(arg) if p not in allowed]
                if unknown:
                    raise ValueError(f"{field}: {{{unknown[0]}}} is not one of "
                                     f"{', '.join('{' + a + '}' for a in sorted(allowed)) or 'none (a prefix)'}")
        if not any(p in ("image", "version") for a in self.start for p in _PLACEHOLDER.findall(a)):
            raise ValueError("start names neither {image} nor {version}: the instance would not get the new version")
        return self

    def command(self, which: str, role: str, name: str, image: str = "") -> list[str]:
        """The command `which` (start, check, stop) for `role`, placeholders filled, behind the prefix."""
        values = {"role": role, "name": name, "image": image, "version": version_of_image(image)}
        return [*self.run, *(_PLACEHOLDER.sub(lambda m: values[m.group(1)], a) for a in getattr(self, which))]


def version_of_image(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[-1] if ":" in last else "latest"


class RolloutApp(LateFields):
    late_fields = frozenset({"workload"})  # added after inventories had digests
    region: str = Field(description="the region whose cluster runs the app")
    deployment: str = Field(description="the stable deployment")
    container: str | None = Field(default=None, description="the container whose image changes; default: the first")
    service: str = Field(description="the stable service (blue-green switches its selector)")
    router: Router | None = Field(default=None, description="required for canary rollouts: httproute (default), "
                                  "nginx or traffic-manager")
    canary_replicas: int = Field(default=1, ge=1, description="the canary's size at creation, and its least size "
                                 "as it follows its weight (ceil(weight x stable's replicas))")
    workload: HostWorkload | None = Field(default=None, description="the app runs on hosts, not in Kubernetes: how "
                                          "the worker starts, checks and stops an instance (default: a Deployment)")

    @model_validator(mode="after")
    def _host(self) -> "RolloutApp":
        if self.workload is not None and not isinstance(self.router, NginxRouter):
            raise ValueError("workload.kind host needs the nginx router (router.kind: nginx, its servers the "
                             "instances' host:port)")
        return self

    def workload_queue(self) -> str | None:
        """Where the host workload's commands run: its queue, else the router's (the worker on the NGINX host);
        None for a Kubernetes Deployment (the region's queue)."""
        if self.workload is None:
            return None
        return self.workload.queue or getattr(self.router, "queue", None)


class MetricSpec(Strict):
    """A PromQL template; {deployment}, {version} and {interval} are filled in for canary and baseline."""

    name: str
    query: str
    max: float | None = Field(default=None, description="absolute limit on the canary's value (fail fast when above)")
    min: float | None = Field(default=None, description="absolute limit on the canary's value (fail fast when below)")
    judge: bool = True
    direction: Direction = "increase"
    critical: bool = False
    missing: Missing = Field(
        default="inconclusive",
        description="a missing or empty series / NaN points (Kayenta's nanStrategy): zero = the value is 0 (no 5xx "
        "series yet: no errors), skip = leave the metric out of the score, inconclusive = never a pass",
    )
    effect: float | None = Field(
        default=None, ge=0, description="effect size: the relative change (0.1 = 10 %) a clear shift must exceed to "
        "fail; default: analysis.tolerance",
    )


class AnalysisSpec(LateFields):
    late_fields = frozenset({"baseline", "limit_min_requests"})  # added after inventories had digests

    prometheus: str = Field(description="Prometheus HTTP API base URL")
    interval: Seconds = Field(default=60, description="how often the bake looks at the figures")
    step: Seconds = Field(default=10, description="query_range resolution: one sample per step")
    min_requests: int = Field(
        default=100, ge=0, description="canary requests in the bake below which the judge says inconclusive"
    )
    limit_min_requests: int = Field(
        default=20, ge=0, description="canary requests in the last interval below which a limit (max/min) does "
        "not judge at a look: not enough traffic yet, neither pass nor fail (needs `requests`; without it limits "
        "judge whatever samples there are)",
    )
    requests: str | None = Field(default=None, description="PromQL for the request count over {interval}")
    metrics: list[MetricSpec] = Field(min_length=1)
    confidence: float = Field(default=0.98, gt=0.5, lt=1)
    tolerance: float = Field(default=0.25, ge=0)
    min_samples: int = Field(default=5, ge=1)
    pass_score: float = Field(default=95, ge=0, le=100)
    marginal_score: float = Field(default=75, ge=0, le=100)
    baseline: Literal["stable", "fresh"] = Field(
        default="stable",
        description="what the canary is judged against: the warm stable fleet, or (Kayenta's practice) a fresh "
        "`<app>-baseline` from stable's spec and image, as big as the canary, started with it and given the same "
        "weight; removed at the end (promote or rollback)",
    )

    _d = field_validator("interval", "step", mode="before")(parse_duration)


class HttpCheck(Strict):
    """An HTTP check run at every look during a bake, beside the metrics (Flagger's webhooks): `smoke` GETs the URL
    and expects `status` (and `body` in the answer); `webhook` POSTs the rollout's context as JSON and passes on
    a 2xx answer (unless its JSON says "pass": false). A critical check that fails rolls back at once; a
    non-critical one is counted, and a bake with such failures is at best marginal (a person decides)."""

    name: str
    kind: Literal["smoke", "webhook"] = "smoke"
    url: str = Field(description="http(s) URL; {app}, {weight} and {version} are filled in")
    status: int = Field(default=200, ge=100, le=599, description="smoke: the expected status")
    body: str | None = Field(default=None, description="smoke: a text the answer's body must contain")
    critical: bool = True
    timeout: Seconds = Field(default=10, gt=0, le=120)

    _d = field_validator("timeout", mode="before")(parse_duration)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v


class RolloutPolicy(Strict):
    apps: dict[str, RolloutApp] = Field(min_length=1)
    analysis: AnalysisSpec
    steps: list[int] = Field(default=[5, 25, 50, 100], description="canary weights in percent; 100 is the promotion")
    bake: Seconds = 600
    windows: list[WeeklyWindow] = Field(default=[], description="deployments only inside one of these (none: any time)")
    freezes: list[Freeze] = Field(
        default=[], description="deployment freezes: one-off events or weekly (e.g. Friday after 12:00)"
    )
    ics: list[FreezeCalendar] = Field(
        default=[], description=".ics freeze calendars (holidays, sales), expanded when the inventory is loaded"
    )
    approval: ApprovalPolicy | None = Field(default=None, description="default: the inventory's approval policy")
    rollback_window: Seconds = Field(default=600, description="blue-green: how long the old colour is kept")
    timeout: Seconds = Field(default=900, description="bound on a rollout's wait for readiness")
    checks: list[HttpCheck] = Field(default=[], description="HTTP checks run at every look during a bake")
    on_freeze: Literal["hold", "rollback"] = Field(
        default="hold",
        description="a freeze that begins or a window that closes during a rollout: hold the current weight (bake "
        "and analysis go on) until it opens or a person decides, or roll back",
    )
    hold_max: Seconds = Field(default=72 * 3600, gt=0, description="bound on a hold; then the rollout rolls back")

    _d = field_validator("bake", "rollback_window", "timeout", "hold_max", mode="before")(parse_duration)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 < w <= 100 for w in v) or v != sorted(set(v)):
            raise ValueError("steps are increasing weights between 1 and 100, e.g. [5, 25, 50, 100]")
        return v if v[-1] == 100 else [*v, 100]

    @model_validator(mode="after")
    def _scores(self) -> "RolloutPolicy":
        if self.analysis.marginal_score > self.analysis.pass_score:
            raise ValueError("analysis.marginal_score must not be above analysis.pass_score")
        if self.analysis.baseline == "fresh":
            why = fresh_baseline_refusal(self.steps)
            if why:
                raise ValueError(why)
            for name, app in self.apps.items():
                why = fresh_baseline_router_refusal(app)
                if why:
                    raise ValueError(f"apps.{name}: {why}")
        return self

    def router_queues(self) -> set[str]:
        """The queues of workers outside the regions (the NGINX host's): routers' and host workloads' own."""
        return {q for a in self.apps.values() for q in (getattr(a.router, "queue", None), a.workload_queue()) if q}

    def app(self, name: str | None) -> tuple[str, RolloutApp]:
        if name is None:
            if len(self.apps) != 1:
                raise ValueError(f"several apps in rollout.apps ({', '.join(self.apps)}): name one with --app")
            name = next(iter(self.apps))
        if name not in self.apps:
            raise ValueError(f"unknown app {name!r}; rollout.apps has: {', '.join(self.apps)}")
        return name, self.apps[name]


def fresh_baseline_refusal(steps: list[int]) -> str | None:
    """A fresh baseline takes the canary's weight too: no weight below 100 may be above 50."""
    high = [w for w in steps if 50 < w < 100]
    if high:
        return (f"analysis.baseline: fresh gives the baseline the canary's weight too, so the steps below 100 are at "
                f"most 50 (not {', '.join(map(str, high))})")
    return None


def fresh_baseline_router_refusal(app: RolloutApp) -> str | None:
    r = app.router
    if isinstance(r, TrafficManagerRouter):
        return "analysis.baseline: fresh needs a three-way split; the traffic-manager router has two endpoints"
    if isinstance(r, NginxRouter) and not r.servers.get("baseline"):
        return "analysis.baseline: fresh needs router.servers.baseline (the baseline's host:port)"
    return None


# -- what the activities act on -------------------------------------------------------------------------------


class RolloutTarget(BaseModel):
    environment: str
    region: str
    kubernetes: KubernetesConfig | None = None  # None: a host workload's region may have no cluster
    app: RolloutApp
    canary_suffix: str = "-canary"
    azure: AzureConnection | None = None  # the traffic-manager router: how to reach ARM

    def baseline_target(self) -> "RolloutTarget":
        """The fresh baseline, `<app>-baseline`, handled as a canary copy of its own (its service too)."""
        return self.model_copy(update={"canary_suffix": BASELINE_SUFFIX})

    @property
    def canary(self) -> str:
        return f"{self.app.deployment}{self.canary_suffix}"

    @property
    def canary_service(self) -> str:
        return f"{self.app.service}{self.canary_suffix}"


class RolloutState(BaseModel):
    """Stable, canary and router as the cluster has them."""

    stable: str
    stable_image: str | None = None
    stable_desired: int = 0
    stable_ready: int = 0
    stable_done: bool = False
    canary: str | None = None  # exists
    canary_image: str | None = None
    canary_ready: int = 0
    canary_replicas: int = 0  # desired
    weights: dict[str, int] = {}  # backend service -> weight
    active: str | None = None  # blue-green: the deployment the service selects
    colours: dict[str, str] = {}  # deployment -> image, for the stable's colours
    replicas: dict[str, int] = {}


class ChecksRequest(BaseModel):
    checks: list[HttpCheck]
    app: str
    image: str
    weight: int
    phase: str = "bake"


class CheckResult(BaseModel):
    name: str
    ok: bool
    critical: bool
    status: int | None = None
    reason: str = ""
    seconds: float = 0


class ImageRequest(BaseModel):
    target: RolloutTarget
    image: str
    wait_seconds: float | None = None


class WeightRequest(BaseModel):
    target: RolloutTarget
    canary_weight: int = Field(ge=0, le=100)
    baseline: bool = False  # a fresh baseline gets the canary's weight too (stable: 100 - 2 x weight)

    def shares(self) -> dict[str, int]:
        """role -> percent: stable, canary (and baseline)."""
        w = self.canary_weight
        if self.baseline:
            return {"stable": max(0, 100 - 2 * w), "canary": w, "baseline": w}
        return {"stable": 100 - w, "canary": w}


class RouterState(BaseModel):
    """What a router sends where, by role (stable, canary, baseline), in percent, and what it is."""

    kind: str
    router: str  # e.g. "nginx upstream web in /etc/nginx/conf.d/web-upstream.conf"
    weights: dict[str, int] = {}
    detail: str = ""


class DeploymentRequest(BaseModel):
    target: RolloutTarget
    deployment: str
    replicas: int | None = None


class SamplesRequest(BaseModel):
    analysis: AnalysisSpec
    canary: str  # deployment names
    baseline: str
    canary_version: str = ""
    baseline_version: str = ""
    start: datetime
    end: datetime
    baseline_start: datetime | None = None  # blue-green: the baseline's figures from before the switch
    baseline_end: datetime | None = None


class MetricSamples(BaseModel):
    name: str
    canary: list[float]
    baseline: list[float]
    # `missing: zero`: how many leading values are zeros filled in before the series had any point
    canary_filled: int = 0
    baseline_filled: int = 0


class Samples(BaseModel):
    metrics: list[MetricSamples]
    canary_requests: float | None = None
    baseline_requests: float | None = None
    # the canary's requests in the span a limit judges: the last interval (with `requests`; 0 when Prometheus has
    # no such series). None: not counted (no `requests`, or an activity from before)
    canary_recent_requests: float | None = None
    # Prometheus has the canary's request series in the recent span (it counts from here on); None: not asked
    canary_seen: bool | None = None
    start: datetime
    end: datetime


class JudgeRequest(BaseModel):
    analysis: AnalysisSpec
    samples: Samples
    weight: int


class MetricVerdict(BaseModel):
    """One metric at one step: the canary's and the baseline's figures and what was decided."""

    name: str
    verdict: Literal["pass", "high", "low", "inconclusive", "breach", "skipped"]
    canary: float | None = None  # mean over the window
    baseline: float | None = None
    ratio: float | None = None
    estimate: float | None = None  # Hodges-Lehmann shift canary - baseline
    lower: float | None = None
    upper: float | None = None
    p_value: float | None = None
    canary_samples: int = 0
    baseline_samples: int = 0
    critical: bool = False
    reason: str = ""


class StepAnalysis(BaseModel):
    weight: int
    kind: Literal["interval", "judge", "post-switch"] = "judge"
    verdict: Literal["pass", "marginal", "fail", "inconclusive"]
    score: float | None = None
    start: datetime | None = None
    end: datetime | None = None
    canary_requests: float | None = None
    baseline_requests: float | None = None
    metrics: list[MetricVerdict] = []
    reason: str = ""

    def failed_metrics(self) -> list[MetricVerdict]:
        return [m for m in self.metrics if m.verdict in ("high", "low", "breach")]


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v == v and v not in (float("inf"), float("-inf"))]


def recent(analysis: AnalysisSpec, values: list[float], filled: int = 0) -> list[float]:
    """The values an absolute limit judges (as Argo and Flagger do, the latest measurement): the last
    `analysis.interval` worth of samples, leaving out the zeros `missing: zero` filled in before the series had
    any point (unless the series never had one: then its value is 0)."""
    if 0 < filled < len(values):
        values = values[filled:]
    n = max(1, round(analysis.interval / max(analysis.step, 0.001)))
    return _finite(values[-n:])


def has_limits(analysis: AnalysisSpec) -> bool:
    return any(m.max is not None or m.min is not None for m in analysis.metrics)


def limit_shortfall(analysis: AnalysisSpec, samples: Samples, *, recent_span: bool = True) -> str | None:
    """Why the limits may not judge these samples -- not enough canary traffic in the span judged (the recent one,
    or with `recent_span=False` the whole window) -- or None when they may (or when the requests are not counted:
    no `analysis.requests`). Neither a pass nor a fail."""
    count = samples.canary_recent_requests if recent_span else samples.canary_requests
    if analysis.requests is None or count is None or count >= analysis.limit_min_requests:
        return None
    span = analysis.interval if recent_span else (samples.end - samples.start).total_seconds()
    return (f"not enough traffic yet: {count:.0f} canary request(s) in the last {span:.0f}s, limits judge from "
            f"{analysis.limit_min_requests}")


def threshold_breaches(analysis: AnalysisSpec, samples: Samples, *, latest: bool = False) -> list[MetricVerdict]:
    """Absolute limits on the canary's mean in the window: pure arithmetic, safe in a workflow. With `latest`
    (patch "limit-on-recent-samples"), on the last interval's samples (recent()) rather than the whole window."""
    out = []
    specs = {m.name: m for m in analysis.metrics}
    for ms in samples.metrics:
        spec = specs.get(ms.name)
        values = recent(analysis, ms.canary, ms.canary_filled) if latest else _finite(ms.canary)
        if spec is None or not values:
            continue
        mean = sum(values) / len(values)
        base = recent(analysis, ms.baseline, ms.baseline_filled) if latest else _finite(ms.baseline)
        base_mean = sum(base) / len(base) if base else None
        why = None
        if spec.max is not None and mean > spec.max:
            why = f"canary {mean:.4g} above the limit {spec.max:g}"
        elif spec.min is not None and mean < spec.min:
            why = f"canary {mean:.4g} below the limit {spec.min:g}"
        if why:
            out.append(
                MetricVerdict(
                    name=ms.name,
                    verdict="breach",
                    canary=mean,
                    baseline=base_mean,
                    canary_samples=len(values),
                    baseline_samples=len(base),
                    critical=spec.critical,
                    reason=why + (f" (baseline {base_mean:.4g})" if base_mean is not None else ""),
                )
            )
    return out


def closed_because(policy: RolloutPolicy, now: datetime) -> str | None:
    """Why a deployment may not start at `now` (a freeze, or outside every window); None when it may.
    Deterministic (the calendar module at `now`): safe in a workflow at workflow.now()."""
    cal = Calendar(windows=policy.windows, freezes=policy.freezes, ics=policy.ics)
    hit = cal.frozen(now)
    if hit is not None:
        return f"deployment freeze {hit.name!r}" + (f" until {hit.until:%Y-%m-%d %H:%M %Z}" if hit.until else "")
    if not cal.in_window(now):
        try:
            nxt = cal.next_opening(now)
            when = f"; next opening {nxt:%Y-%m-%d %H:%M %Z}" if nxt else ""
        except NeverOpens as e:
            when = f"; {e.message}"
        return f"outside the deployment windows ({'; '.join(w.describe() for w in policy.windows)}){when}"
    return None
