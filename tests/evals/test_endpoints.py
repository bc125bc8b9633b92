"""Base URLs: ``--base-url`` over ``SAFEGATE_BASE_URL`` over the suite, on the shipped
suites (a gateway model on :8000, a litellm model on the local server's :8001)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evals.cache import CallCache
from evals.endpoints import Endpoints, apply_endpoints, parse_endpoints
from evals.errors import ModelNotFound, RunError, SuiteError
from evals.runs import RunStore
from evals.settings import get_settings
from evals.suite import ChosenModel, GatewayModel, choose_models, load_suite
from safegate.cli import app
from tests.evals.conftest import FakeCaller, Killed, make_runner, write_suite

SUITES = Path(__file__).resolve().parents[2] / "evals" / "suites"
GW = "http://gateway.internal:9000/v1"
MODELS = "http://models.internal:9001/v1"


def urls(chosen: list[ChosenModel]) -> dict[str, tuple[str | None, str | None]]:
    """model name -> (the URL it will be called at, where that URL came from)."""
    found: dict[str, tuple[str | None, str | None]] = {}
    for item in chosen:
        spec = item.spec
        url = spec.base_url if isinstance(spec, GatewayModel) else spec.params.get("api_base")
        found[spec.name] = (url, item.base_url_from)
    return found


@pytest.mark.parametrize("suite_file", ["smoke.yaml", "safety.yaml"])
def test_the_shipped_suites_move_the_gateway_and_keep_the_direct_model(suite_file: str) -> None:
    suite = load_suite(SUITES / suite_file)
    everything = choose_models(suite, None)
    assert urls(everything) == {
        "demo": ("http://127.0.0.1:8000/v1", None),
        "demo-direct": ("http://127.0.0.1:8001/v1", None),
    }

    from_env = apply_endpoints(suite, everything, parse_endpoints(environ_value=GW))
    assert urls(from_env) == {
        "demo": (GW, "SAFEGATE_BASE_URL"),
        "demo-direct": ("http://127.0.0.1:8001/v1", None),  # never sent through the filter
    }

    option = "http://127.0.0.1:18100/v1"
    both = apply_endpoints(suite, everything, parse_endpoints([option], environ_value=GW))
    assert urls(both)["demo"] == (option, "--base-url")  # the command line wins

    named = parse_endpoints([option, f"demo-direct={MODELS}"], environ_value=GW)
    assert urls(apply_endpoints(suite, everything, named)) == {
        "demo": (option, "--base-url"),
        "demo-direct": (MODELS, "--base-url"),
    }
    # a named URL wins over the bare one for its model
    pinned = parse_endpoints([option, f"demo={GW}"])
    assert urls(apply_endpoints(suite, everything, pinned))["demo"] == (GW, "--base-url")

    # an override model (--model gateway:NAME) is a gateway model too
    candidate = apply_endpoints(suite, choose_models(suite, "gateway:support-v2"), named)
    assert urls(candidate) == {"support-v2": (option, "--base-url")}


def test_nothing_changes_without_an_override() -> None:
    suite = load_suite(SUITES / "smoke.yaml")
    chosen = choose_models(suite, None)
    assert apply_endpoints(suite, chosen, Endpoints()) == chosen
    assert apply_endpoints(suite, chosen, parse_endpoints([], environ_value="  ")) == chosen


@pytest.mark.parametrize(
    ("options", "environ", "message"),
    [
        (["localhost:8000"], None, "--base-url: 'localhost:8000' is not an http(s) base URL"),
        (["ftp://gw/v1"], None, "--base-url: 'ftp://gw/v1' is not an http(s) base URL"),
        (["http:///v1"], None, "is not an http(s) base URL"),
        (["http://gw:port/v1"], None, "'http://gw:port/v1' is not an http(s) base URL"),
        (["http://gw:99999/v1"], None, "is not an http(s) base URL"),
        (["http://gw/v1?x=1"], None, "is not an http(s) base URL"),
        (["http://g w/v1"], None, "is not an http(s) base URL"),
        (["demo=gw:8000"], None, "--base-url demo=URL: 'gw:8000' is not an http(s) base URL"),
        ([], "8000", "SAFEGATE_BASE_URL: '8000' is not an http(s) base URL"),
        ([GW, MODELS], None, "--base-url: two gateway URLs"),
        ([f"demo={GW}", f"demo={MODELS}"], None, "model 'demo' is given two URLs"),
    ],
)
def test_malformed_urls_are_refused_in_one_line(
    options: list[str], environ: str | None, message: str
) -> None:
    with pytest.raises(SuiteError) as caught:
        parse_endpoints(options, environ_value=environ)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_url_in_the_suite_names_the_field(tmp_path: Path) -> None:
    bad = {"name": "demo", "via": "gateway", "base_url": "127.0.0.1:8000"}
    with pytest.raises(SuiteError, match=r"suite.yaml: models\[0\].base_url: '127.0.0.1:8000' is"):
        load_suite(write_suite(tmp_path, models=[bad]))


def test_unknown_names_and_a_gateway_url_with_no_gateway_model(tmp_path: Path) -> None:
    suite = load_suite(SUITES / "smoke.yaml")
    with pytest.raises(ModelNotFound, match="--base-url: no model named 'dmeo'; the suite has"):
        apply_endpoints(suite, choose_models(suite, None), parse_endpoints([f"dmeo={GW}"]))
    direct = choose_models(suite, "demo-direct")
    with pytest.raises(SuiteError, match=r"no gateway model runs \(demo-direct via litellm\)"):
        apply_endpoints(suite, direct, parse_endpoints([GW]))
    # the environment is for every suite: with no gateway model it changes nothing
    assert apply_endpoints(suite, direct, parse_endpoints(environ_value=GW)) == direct


def test_a_run_records_the_url_and_resumes_only_at_it(
    tmp_path: Path, store: RunStore, cache: CallCache
) -> None:
    suite = write_suite(tmp_path, concurrency=1)  # one litellm model, "mock"
    moved = parse_endpoints([f"mock={MODELS}"])
    seen: list[ChosenModel] = []
    caller = FakeCaller(kill_after=2)

    def factory(chosen: ChosenModel) -> FakeCaller:
        seen.append(chosen)
        return caller

    runner = make_runner(store, cache, caller)
    runner.caller_factory = factory
    with pytest.raises(Killed):
        runner.run(suite, endpoints=moved)
    assert {urls([item])[item.spec.name][0] for item in seen} == {MODELS}
    (run,) = store.list()
    assert run.config["model"]["identity"]["params"]["api_base"] == MODELS
    assert run.config["model"]["base_url_from"] == "--base-url"

    moved_away = f"it ran at {MODELS}, now at the provider default; pass the same --base-url"
    with pytest.raises(RunError, match=moved_away):
        make_runner(store, cache, FakeCaller()).run(suite, resume=run.id)
    (resumed,) = make_runner(store, cache, FakeCaller()).run(suite, resume=run.id, endpoints=moved)
    assert resumed.id == run.id
    assert resumed.counts["done"] == 6


def safegate(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, result.stdout, result.stderr


def test_the_command_line_wins_over_the_environment_over_the_suite(
    tmp_path: Path, eval_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on these ports: the check before any call names the URL it tried.
    gateway = {
        "name": "demo",
        "via": "gateway",
        "base_url": "http://127.0.0.1:18197/v1",
        "max_retries": 0,
        "timeout_s": 5,
    }
    suite = str(write_suite(tmp_path, models=[gateway]))
    monkeypatch.setenv("SAFEGATE_KEY", "sg-test")
    monkeypatch.delenv("SAFEGATE_BASE_URL", raising=False)
    get_settings.cache_clear()

    code, out, err = safegate("run", suite, "--no-progress")
    assert (code, out) == (2, "")
    assert "models[0]: cannot reach the gateway at http://127.0.0.1:18197/v1" in err

    monkeypatch.setenv("SAFEGATE_BASE_URL", "http://127.0.0.1:18198/v1")
    get_settings.cache_clear()
    code, _, err = safegate("run", suite, "--no-progress")
    assert code == 2
    assert (
        "models[0] (base URL from SAFEGATE_BASE_URL): cannot reach the gateway at "
        "http://127.0.0.1:18198/v1" in err
    )

    code, _, err = safegate(
        "run", suite, "--no-progress", "--base-url", "http://127.0.0.1:18199/v1"
    )
    assert code == 2
    assert (
        "models[0] (base URL from --base-url): cannot reach the gateway at "
        "http://127.0.0.1:18199/v1" in err
    )

    code, out, err = safegate("run", suite, "--base-url", "127.0.0.1:18199")
    assert (code, out) == (2, "")
    assert err.strip() == (
        "error: --base-url: '127.0.0.1:18199' is not an http(s) base URL "
        "(e.g. http://127.0.0.1:8000/v1)"
    )

    monkeypatch.setenv("SAFEGATE_BASE_URL", "gateway:8000")
    get_settings.cache_clear()
    code, _, err = safegate("run", suite)
    assert code == 2
    assert err.strip().startswith("error: SAFEGATE_BASE_URL: 'gateway:8000' is not")
    assert "Traceback" not in err
    assert safegate("list", "--json")[1].strip() == "[]"  # nothing ran


def test_a_named_url_reaches_a_litellm_model(tmp_path: Path, eval_home: Path) -> None:
    suite = write_suite(tmp_path)  # "mock" answers through litellm's mock_response
    code, out, err = safegate("run", str(suite), "--no-progress", "--base-url", f"mock={MODELS}")
    assert code == 0, err
    run_id = out.splitlines()[-1]
    record = json.loads((eval_home / "evals" / run_id / "run.json").read_text(encoding="utf-8"))
    assert record["config"]["model"]["identity"]["params"]["api_base"] == MODELS
