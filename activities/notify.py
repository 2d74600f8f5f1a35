"""Notifications: webhook (JSON) and Slack incoming-webhook channels from the inventory."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from temporalio.exceptions import ApplicationError

from activities.context import heartbeating
from activities.secrets import resolve
from opsflow.contracts.notify import NOTIFY_SEND
from opsflow.inventory import NotificationChannel
from opsflow.models import Notification, NotifyRequest


@NOTIFY_SEND.implementation
def send(request: NotifyRequest) -> list[str]:
    """Send to the named channels (all channels when none are named). Returns the channels reached."""
    n = request.notification
    channels = [c for c in request.channels if not n.channels or c.name in n.channels]
    unknown = set(n.channels) - {c.name for c in request.channels}
    if unknown:
        raise ApplicationError(
            f"unknown notification channel(s): {', '.join(sorted(unknown))}", type="BadInput", non_retryable=True
        )
    with heartbeating("sending notifications"):  # a worker lost mid-send is noticed within the heartbeat timeout
        return _send(n, channels)


def _send(n: Notification, channels: list[NotificationChannel]) -> list[str]:
    sent = []
    for channel in channels:
        # url: only in inventories recorded before secret-only channels
        url = channel.url or resolve(channel.url_secret)
        if channel.kind == "slack":
            body = {"text": f"[{n.severity}] {n.environment}: {n.text}"}
        else:
            body = n.model_dump(mode="json")
        try:
            # urllib quotes a URL it cannot use in its error (the secret itself): name the channel instead.
            req = urllib.request.Request(
                url.strip(), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
            )
        except ValueError:
            raise ApplicationError(
                f"channel {channel.name}: its URL is not an http(s) URL (no scheme?)",
                type="BadInput",
                non_retryable=True,
            ) from None
        try:
            with urllib.request.urlopen(req, timeout=10):
                pass
        except urllib.error.HTTPError as e:
            # 4xx (other than throttling) will not get better by retrying.
            raise ApplicationError(
                f"channel {channel.name}: HTTP {e.code}",
                type="NotifyFailed",
                non_retryable=400 <= e.code < 500 and e.code != 429,
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise ApplicationError(f"channel {channel.name}: {getattr(e, 'reason', e)}", type="NotifyFailed") from None
        except ValueError as e:  # http.client's InvalidURL (a control character in the URL) quotes the URL's path
            raise ApplicationError(
                f"channel {channel.name}: its URL is not valid ({type(e).__name__})",
                type="BadInput",
                non_retryable=True,
            ) from None
        sent.append(channel.name)
    return sent
