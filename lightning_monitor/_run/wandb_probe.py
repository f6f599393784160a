"""Whether a wandb run can be online, asked before it starts: an API key wandb will find without prompting, and a
W&B server that answers the query wandb's own client makes, within ``NETWORK_TIMEOUT_SEC``
(:func:`~lightning_monitor._run.wandb_start.decide_mode` reads :func:`server_problem`)."""

from __future__ import annotations

import base64
import json
import netrc
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Optional
from urllib.parse import urlsplit

from lightning_monitor._core.compat import stop_wandb_analytics, wandb_session_key

#: seconds the server may take to answer one HTTP request before the run is offline.
NETWORK_TIMEOUT_SEC = 2.0
DEFAULT_BASE_URL = "https://api.wandb.ai"
#: the online probe: the ``serverInfo`` query wandb's own client makes (its ``ServerFeaturesQuery``), reduced to what
#: every W&B server version answers
PROBE_QUERY = "query LightningMonitorProbe { serverInfo { __typename } }"
#: bytes of the probe's answer read at most (a W&B server's is about 60)
PROBE_MAX_BYTES = 65536


def server_problem(settings: Any) -> Optional[str]:
    """Why a run cannot be online (no API key, no W&B server answering), or ``None`` when it can."""
    base_url = str(_setting(settings, "base_url") or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
    key = _api_key(base_url, settings)
    if key is None:
        return "no W&B API key: set WANDB_API_KEY or run `wandb login`"
    return _not_a_wandb_server(base_url, key, settings)


def _setting(settings: Any, name: str) -> Any:
    return settings.get(name) if isinstance(settings, Mapping) else getattr(settings, name, None)


def _has_credentials(base_url: str, settings: Any) -> bool:
    """Whether wandb will find credentials for ``base_url`` without prompting (the places it looks, in order)."""
    return _api_key(base_url, settings) is not None


def _api_key(base_url: str, settings: Any) -> Optional[str]:
    """The API key wandb will use for ``base_url`` (the places it looks, in order); ``""`` when it authenticates
    another way we cannot read (an identity token file, an earlier ``wandb.login`` of another kind), ``None`` when
    it would have to ask for one."""
    key = _setting(settings, "api_key") or os.environ.get("WANDB_API_KEY")
    if key:
        return str(key)
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return ""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(base_url).netloc)  # wandb's key: host[:port]
        if entry is not None and entry[2]:
            return entry[2]
    except (OSError, netrc.NetrcParseError):
        pass
    return wandb_session_key(base_url)  # an earlier `wandb.login(key=...)` in this process


def _not_a_wandb_server(base_url: str, api_key: str, settings: Any = None) -> Optional[str]:
    """``None`` when a W&B server at ``base_url`` answers :data:`PROBE_QUERY` within ``NETWORK_TIMEOUT_SEC``, else
    why not (no answer, an answer no W&B server gives, the API key refused).

    Any HTTP answer is not enough: a reverse proxy answering ``200 {}`` to every request let wandb start online, and
    its service crashed while finishing the run. The probe is a GraphQL query wandb's own client makes too
    (``serverInfo`` on ``/graphql``, the key as HTTP basic auth ``api:<key>`` as wandb sends it; wandb 0.31
    checked), and only a W&B server answers it with ``{"data": {"serverInfo": {"__typename": "ServerInfo"}}}``. The
    extra HTTP headers and the TLS choice the user gave wandb (``x_extra_http_headers``, ``insecure_disable_ssl``)
    go with it. A TCP connection is not enough either: a server that accepts connections and never answers made
    ``wandb.init`` wait for its whole ``init_timeout``. Proxies set in the environment are used, as wandb uses them.
    """
    outcome: list[Optional[str]] = []
    url = base_url.rstrip("/") + "/graphql"
    headers = {"Content-Type": "application/json", "User-Agent": "lightning-monitor", **_extra_headers(settings)}
    if api_key:
        headers["Authorization"] = "Basic " + base64.b64encode(f"api:{api_key}".encode()).decode()
    request = urllib.request.Request(url, data=json.dumps({"query": PROBE_QUERY}).encode(), headers=headers)
    context = None
    if _setting(settings, "insecure_disable_ssl") or _truthy(os.environ.get("WANDB_INSECURE_DISABLE_SSL")):
        context = ssl.create_default_context()  # the user turned wandb's certificate check off: ours too
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    def probe() -> None:
        try:
            with urllib.request.urlopen(  # noqa: S310 - the W&B server
                request, timeout=NETWORK_TIMEOUT_SEC, context=context
            ) as response:
                outcome.append(_judge(base_url, response.status, response.read(PROBE_MAX_BYTES), bool(api_key)))
        except urllib.error.HTTPError as err:  # it answered with an error status (401, 404 ...)
            outcome.append(_judge(base_url, err.code, err.read(PROBE_MAX_BYTES), bool(api_key)))
        except Exception as err:  # noqa: BLE001 - any other failure means no answer
            outcome.append(f"{base_url} did not answer ({type(err).__name__}: {getattr(err, 'reason', err)})")

    thread = threading.Thread(target=probe, name="lightning-monitor-wandb-probe", daemon=True)
    thread.start()
    thread.join(NETWORK_TIMEOUT_SEC * 1.5)  # name resolution has no timeout of its own
    if outcome and outcome[0] is None:
        return None
    stop_wandb_analytics()  # wandb would send them to this server, and wait for it at exit (wandb_start)
    if not outcome:
        return f"{base_url} did not answer within {NETWORK_TIMEOUT_SEC:.0f} s"
    return outcome[0]


def _extra_headers(settings: Any) -> dict[str, str]:
    """The extra HTTP headers wandb sends to the server (``x_extra_http_headers``: its settings, or a JSON object in
    ``WANDB__EXTRA_HTTP_HEADERS``, the environment name wandb reads it from)."""
    headers = _setting(settings, "x_extra_http_headers") or os.environ.get("WANDB__EXTRA_HTTP_HEADERS")
    if isinstance(headers, str):
        try:
            headers = json.loads(headers)
        except ValueError:
            return {}
    return {str(k): str(v) for k, v in headers.items()} if isinstance(headers, Mapping) else {}


def _truthy(value: Optional[str]) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _judge(base_url: str, status: int, body: bytes, key_sent: bool) -> Optional[str]:
    """``None`` when ``status`` and ``body`` are a W&B server's answer to :data:`PROBE_QUERY`, else why the run
    cannot be online. A refusal (401, 403) of a key we sent is final (wandb would fail to start with it); without a
    key of ours to send (an identity token), a GraphQL refusal is left to wandb's own authentication."""
    try:
        answer = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        answer = None
    errors = answer.get("errors") if isinstance(answer, dict) else None
    first_error = ""
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first_error = f": {str(errors[0].get('message', ''))[:200]}"
    if status in (401, 403) and key_sent:
        return f"the server at {base_url} refused the API key (HTTP {status}{first_error})"
    if status in (401, 403) and errors:
        return None  # a GraphQL server asking for credentials we cannot send: wandb's own start decides
    data = answer.get("data") if isinstance(answer, dict) else None
    info = data.get("serverInfo") if isinstance(data, dict) else None
    if status == 200 and isinstance(info, dict) and info.get("__typename") == "ServerInfo":
        return None
    what = "not JSON" if answer is None else f"no serverInfo in the answer{first_error}"
    return f"{base_url} answers, but not as a W&B server (POST /graphql: HTTP {status}, {what})"
