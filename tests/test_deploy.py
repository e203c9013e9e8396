"""deploy/ agrees with the code it runs: the Dockerfile, the compose file, the Kubernetes manifests, the
crontab and deploy/README.md.

Fast and offline: no Docker, no cluster, no network, no database. Every `credits …` command line found in
those files is parsed by the CLI's own click command (subcommand, options, value types, choices and
callbacks), so a renamed command or option breaks here rather than at 3 a.m. in a CronJob.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.routing import Route

from service.entry.api import create_app
from service.entry.cli import app as cli_app
from service.infra import catalogue, runtime
from service.infra.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "credits.env.example"
CRONTAB = DEPLOY / "crontab"
README = DEPLOY / "README.md"

IMAGE_PREFIX = "stripe-credits"
APP_LABEL = ("app.kubernetes.io/name", "stripe-credits")
SECRET_KEYS = {"DATABASE_URL", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_KEY", "CREDITS_API_TOKEN", "CREDITS_ADMIN_TOKEN"}
SETTINGS_VARS = {name.upper() for name in Settings.model_fields}
CLI = typer.main.get_command(cli_app)

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


# --- parsing helpers ----------------------------------------------------------------------------------


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently; a
    duplicated `env:` or `args:` would hide half a manifest). `<<` merges are not duplicates."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _docs(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(_rel(p), d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(where, d) for where, d in _k8s_docs() if d.get("kind") == kind]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def _stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """Each build stage as (resolved base image, its instructions); ARG defaults before FROM are applied."""
    args: dict[str, str] = {}
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for instruction, rest in _dockerfile():
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest.split()[0])
            stages.append((image, [(instruction, rest)]))
        elif stages:
            stages[-1][1].append((instruction, rest))
    return stages


def _exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"not the exec (JSON) form: {rest}"
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def _final(instruction: str) -> str:
    """The last value of an instruction in the final stage."""
    found = [rest for ins, rest in _stages()[-1][1] if ins == instruction]
    assert found, f"the final stage has no {instruction}"
    return found[-1]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in _stages()[-1][1]:
        if instruction == "ENV":
            for word in shlex.split(rest):
                key, sep, value = word.partition("=")
                if sep:
                    env[key] = value
    return env


ENTRYPOINT = _exec_form(_final("ENTRYPOINT"))
CMD = _exec_form(_final("CMD"))

SEPARATORS = {"&&", "||", ";", ";;", "|", "&", "(", ")"}
PREFIX_WORDS = {"do", "then", "else", "elif", "while", "until", "if", "!", "{", "}", "exec", "time", "nohup"}


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, each as its words: separators split, redirections and
    leading keywords / VAR=value assignments dropped. Enough for the scripts in deploy/, not a shell."""
    commands: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        tokens = list(lexer)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in SEPARATORS:
                commands.append(words)
                words = []
            elif re.fullmatch(r"[<>]+&?|&>", token):  # a redirection: drop it, its target and an fd before it
                if words and words[-1].isdigit():
                    words.pop()
                i += 1
            else:
                words.append(token)
            i += 1
        commands.append(words)
    cleaned = []
    for command in commands:
        words = command
        while words and (words[0] in PREFIX_WORDS or re.fullmatch(r"[A-Za-z_]\w*=.*", words[0])):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def credits_calls(argv: list[str]) -> list[list[str]]:
    """The `credits` argument lists a container's argv runs: itself, or each one in its `sh -c` script."""
    if not argv:
        return []
    if Path(argv[0]).name == "credits":
        return [argv[1:]]
    if Path(argv[0]).name in ("sh", "bash") and "-c" in argv:
        script = argv[argv.index("-c") + 1]
        return [words[1:] for words in shell_commands(script) if Path(words[0]).name == "credits"]
    return []


def _sample(token: str) -> str:
    """A shell expansion (`$(date …)`) stands for a value only the shell knows; give the parser a timestamp,
    the one kind of value deploy/ computes that way (`reconcile --since`)."""
    return "2024-01-01T00:00:00" if "$" in token else token


def check_credits(args: list[str], where: str) -> None:
    """`credits ARGS` is a real subcommand, with real options and values the CLI accepts."""
    command: Any = CLI
    path = ["credits"]
    rest = list(args)
    while hasattr(command, "commands"):  # a group: the next word names a subcommand
        if rest[:1] == ["--help"]:
            return
        assert rest, f"{where}: `{' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        assert name in command.commands, (
            f"{where}: `{' '.join(path)} {name}` is not a command (known: {', '.join(sorted(command.commands))})"
        )
        command, path = command.commands[name], [*path, name]
    options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}
    for token in rest:
        if token.startswith("-") and token != "--help":
            assert token.split("=", 1)[0] in options, (
                f"{where}: `{' '.join(path)}` has no option {token} (it has {', '.join(sorted(options))})"
            )
    if "--help" in rest:
        return
    try:
        command.make_context(path[-1], [_sample(t) for t in rest])
    except Exception as exc:
        pytest.fail(f"{where}: `{' '.join(path + rest)}` is refused by the CLI: {exc}")


def container_argv(container: dict[str, Any]) -> list[str]:
    """What a Kubernetes container runs: `command` replaces the ENTRYPOINT, `args` the CMD."""
    command, args = container.get("command"), container.get("args")
    if command:
        return [*command, *(args or [])]
    return [*ENTRYPOINT, *(args if args is not None else CMD)]


def compose_argv(service: dict[str, Any]) -> list[str]:
    """What a compose service runs; overriding the entrypoint drops the image's CMD, as Docker does."""

    def words(value: Any) -> list[str]:
        return shlex.split(value) if isinstance(value, str) else list(value)

    entrypoint = words(service["entrypoint"]) if "entrypoint" in service else ENTRYPOINT
    default = [] if "entrypoint" in service else CMD
    command = words(service["command"]) if "command" in service else default
    return [part.replace("$$", "$") for part in (*entrypoint, *command)]


def _compose() -> dict[str, Any]:
    (doc,) = _docs(COMPOSE)
    return doc


def _our_compose_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in _compose()["services"].items()
        if "build" in svc or str(svc.get("image", "")).startswith(IMAGE_PREFIX)
    }


def _pod_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, the workload, its pod spec) for every Deployment, Job and CronJob."""
    for where, doc in _k8s_docs():
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{where} {doc['kind']}/{doc['metadata']['name']}", doc, spec["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield f"{where} CronJob/{doc['metadata']['name']}", doc, spec["jobTemplate"]["spec"]["template"]["spec"]


def _our_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for where, _, pod in _pod_specs():
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            if container["image"].startswith(IMAGE_PREFIX):
                yield f"{where} container {container['name']}", pod, container


def _serve_port(argv_args: list[str]) -> int:
    """The port `credits serve …` listens on, as the CLI parses it."""
    assert isinstance(CLI, typer.core.TyperGroup)
    ctx = CLI.commands["serve"].make_context("serve", list(argv_args))
    return int(ctx.params["port"])


def _env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{_rel(path)}: not KEY=value: {line!r}"
            pairs[key.strip()] = value
    return pairs


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """The app's routes (path → methods), built as `credits serve` builds it; no database is opened."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path_factory.mktemp('deploy') / 'never-opened.db'}",
        credits_config=ROOT / "credits.toml",
        credits_api_token=SecretStr("deploy-test-api"),
        credits_admin_token=SecretStr("deploy-test-admin"),
    )
    rt = runtime.load(settings)
    app = create_app(rt)
    found: dict[str, set[str]] = {}
    # The OpenAPI schema lists every included route (app.routes holds the included routers, not their
    # routes); plain routes are added for any route kept out of the schema.
    for path, operations in app.openapi()["paths"].items():
        found.setdefault(path, set()).update(method.upper() for method in operations)
    for route in app.routes:
        if isinstance(route, Route) and route.methods and route.path:
            found.setdefault(route.path, set()).update(route.methods)
    # The health route answers without a token and without touching the database.
    assert TestClient(app).get("/healthz").status_code == 200
    yield found
    rt.engine.dispose()


def _assert_get_route(routes: dict[str, set[str]], url_or_path: str, where: str) -> str:
    path = urlsplit(url_or_path).path or url_or_path
    assert "GET" in routes.get(path, set()), f"{where}: GET {path} is not a route of the app ({sorted(routes)})"
    return path


# --- every YAML file ----------------------------------------------------------------------------------


def test_there_is_something_to_check() -> None:
    names = {_rel(p) for p in YAML_FILES}
    for required in (
        "deploy/compose.yaml",
        "deploy/k8s/api.yaml",
        "deploy/k8s/worker.yaml",
        "deploy/k8s/migrate-job.yaml",
        "deploy/k8s/secret.example.yaml",
        "deploy/k8s/configmap.yaml",
        "deploy/k8s/cronjobs.yaml",
    ):
        assert required in names
    assert DOCKERFILE.is_file() and CRONTAB.is_file() and README.is_file() and ENV_EXAMPLE.is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{_rel(path)} holds no document"
    assert all(isinstance(d, dict) for d in docs)


# --- Dockerfile ---------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    assert stages[-1][0] == "python:3.11-slim"
    assert all(image == stages[-1][0] for image, _ in stages), "one Python for all stages: the venv links to it"


def test_dockerfile_installs_the_package_without_test_extra() -> None:
    runs = [rest for _, instructions in _stages()[:-1] for ins, rest in instructions if ins == "RUN"]
    assert any(re.search(r"\bpip install \.(\s|$)", run) for run in runs), "the builder runs `pip install .`"
    text = " ".join(rest for ins, rest in _dockerfile())
    assert "[test]" not in text and ".[test" not in text, "the image never installs the test extra"
    final_runs = " ".join(rest for ins, rest in _stages()[-1][1] if ins == "RUN")
    assert not re.search(r"pip install|apt-get install|build-essential|gcc", final_runs), "no build tools at run time"
    assert any(ins == "COPY" and "--from=" in rest and "/opt/venv" in rest for ins, rest in _stages()[-1][1])


def test_dockerfile_copies_exactly_what_the_package_needs() -> None:
    sources: list[str] = []
    for instruction, rest in _dockerfile():
        if instruction == "COPY" and "--from=" not in rest:
            words = [w for w in rest.split() if not w.startswith("--")]
            sources += words[:-1]
    for source in sources:
        assert "*" not in source and (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {s.rstrip("/") for s in sources}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]}
    assert packages | {"pyproject.toml", "README.md", "credits.toml"} <= copied, "every top-level package is copied"
    assert "." not in copied, "an explicit COPY list, never the whole context"


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    user = _final("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {user}: numeric (so runAsNonRoot can verify it) and not root"


def test_dockerfile_entrypoint_cmd_and_environment() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert ENTRYPOINT == ["credits"] and "credits" in pyproject["project"]["scripts"]
    assert CMD == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    check_credits(CMD, "Dockerfile CMD")
    env = _image_env()
    assert env["LOG_FORMAT"] == "json"
    assert env["CREDITS_CONFIG"] == "/etc/credits/credits.toml"
    assert "/opt/venv/bin" in env["PATH"].split(":")
    copies = [rest.split() for ins, rest in _stages()[-1][1] if ins == "COPY"]
    assert ["credits.toml", env["CREDITS_CONFIG"]] in copies, "the sample catalogue is where CREDITS_CONFIG points"
    assert _final("EXPOSE").split("/")[0] == str(_serve_port(CMD[1:]))


def test_dockerfile_healthcheck_gets_healthz_with_python(routes: dict[str, set[str]]) -> None:
    rest = _final("HEALTHCHECK")
    argv = _exec_form(rest[rest.index("CMD") + 3 :].strip())
    assert argv[0] == "python", "the slim image has no curl"
    script = " ".join(argv)
    assert "urllib" in script
    url = re.search(r"http://(?:127\.0\.0\.1|localhost):\d+/[^'\"\s)]*", script)
    assert url, script
    assert _assert_get_route(routes, url[0], "HEALTHCHECK") == "/healthz"
    assert urlsplit(url[0]).port == _serve_port(CMD[1:]), "the health check asks the port `serve` listens on"


# --- compose ------------------------------------------------------------------------------------------


def test_compose_services_and_order() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "migrate", "api", "worker", "reconcile", "refill-free"} <= set(services)
    ours = _our_compose_services()
    assert set(ours) == {"migrate", "api", "worker", "reconcile", "refill-free"}
    for name, svc in ours.items():
        assert (
            svc["build"]["dockerfile"] == "deploy/Dockerfile"
            and (COMPOSE.parent / svc["build"]["context"]).resolve() == ROOT
        )
        if name == "migrate":
            assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
            assert svc.get("restart") == "no"
        else:
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    assert compose_argv(ours["migrate"]) == ["credits", "migrate"]
    assert "worker" in credits_calls(compose_argv(ours["worker"]))[0][:1]
    assert ours["worker"].get("stop_grace_period") and ours["api"].get("stop_grace_period")


def test_compose_postgres() -> None:
    compose = _compose()
    pg = compose["services"]["postgres"]
    assert pg["image"].split(":")[0] == "postgres" and pg["image"].split(":")[1].startswith("15")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    volume = pg["volumes"][0].split(":")[0]
    assert volume in compose["volumes"], "the data lives in a named volume"
    assert "ports" not in pg, "PostgreSQL stays on the compose network"


def test_compose_api_port_and_healthcheck(routes: dict[str, set[str]]) -> None:
    api = _compose()["services"]["api"]
    assert "127.0.0.1:8000:8000" in api["ports"]
    argv = compose_argv(api)
    assert argv[:2] == ["credits", "serve"] and _serve_port(argv[2:]) == 8000
    test = " ".join(api["healthcheck"]["test"])
    url = re.search(r"http://127\.0\.0\.1:(\d+)/[^'\"\s)]*", test)
    assert url and int(url[1]) == 8000
    _assert_get_route(routes, url[0], "compose api healthcheck")
    for name, svc in _our_compose_services().items():
        if name != "api":
            assert svc["healthcheck"] == {"disable": True}, f"{name} serves no HTTP: the image's HEALTHCHECK is off"


@pytest.mark.parametrize("service", ["migrate", "api", "worker", "reconcile", "refill-free"])
def test_compose_commands_are_real(service: str) -> None:
    calls = credits_calls(compose_argv(_our_compose_services()[service]))
    assert calls, f"compose service {service} runs no `credits` command"
    for args in calls:
        check_credits(args, f"compose service {service}")


def test_compose_scheduled_loops() -> None:
    services = _our_compose_services()
    assert [c[0] for c in credits_calls(compose_argv(services["reconcile"]))] == ["reconcile"]
    assert [c[:2] for c in credits_calls(compose_argv(services["refill-free"]))] == [["jobs", "refill-free"]]
    for name in ("reconcile", "refill-free"):
        script = compose_argv(services[name])[-1]
        assert "sleep" in script and "trap" in script, f"{name}: a loop that exits on SIGTERM"
        raw = " ".join(_compose()["services"][name]["command"])
        assert not re.search(r"(?<!\$)\$[?!]", raw), f"{name}: `$?`/`$!` must be written `$$?`/`$$!` for compose"


def test_env_example_matches_the_settings_and_postgres() -> None:
    env = _env_file(ENV_EXAMPLE)
    unknown = set(env) - SETTINGS_VARS
    assert not unknown, f"credits.env.example sets variables the service does not read: {unknown}"
    assert {
        "DATABASE_URL",
        "CREDITS_API_TOKEN",
        "CREDITS_ADMIN_TOKEN",
        "STRIPE_WEBHOOK_SECRET",
        "STRIPE_API_KEY",
    } <= set(env)
    assert env["CREDITS_API_TOKEN"] != env["CREDITS_ADMIN_TOKEN"], "start-up refuses equal tokens"
    for key, value in env.items():
        assert not re.search(r"\s#", value) and not value.startswith(("'", '"')), f"{key}: literal values only"
    for svc in _our_compose_services().values():
        assert svc["env_file"] in ("credits.env", ["credits.env"])
    url = urlsplit(env["DATABASE_URL"])
    pg = _compose()["services"]["postgres"]["environment"]
    assert url.hostname == "postgres" and url.hostname in _compose()["services"]
    assert (url.username, url.password, url.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )


# --- Kubernetes ---------------------------------------------------------------------------------------


def test_k8s_documents_are_named_and_labelled() -> None:
    for where, doc in _k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), where
        assert doc["metadata"]["name"].startswith("stripe-credits"), where
        labels = doc["metadata"].get("labels", {})
        assert labels.get(APP_LABEL[0]) == APP_LABEL[1], f"{where}: labelled {APP_LABEL}"


def test_k8s_expected_objects() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in _k8s_docs()}
    assert {
        ("Deployment", "stripe-credits-api"),
        ("Service", "stripe-credits-api"),
        ("Deployment", "stripe-credits-worker"),
        ("Job", "stripe-credits-migrate"),
        ("Secret", "stripe-credits"),
        ("ConfigMap", "stripe-credits-catalogue"),
        ("CronJob", "stripe-credits-reconcile"),
        ("CronJob", "stripe-credits-refill-free"),
    } <= kinds


def test_k8s_workloads_run_as_non_root_with_the_image_user() -> None:
    uid = int(_final("USER").split(":")[0])
    specs = list(_pod_specs())
    assert len(specs) >= 5
    for where, doc, pod in specs:
        ctx = pod.get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert ctx.get("runAsUser", uid) == uid, f"{where}: runAsUser is the image's uid {uid}"
        for container in pod["containers"]:
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", uid) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation: false"
            assert container.get("resources", {}).get("requests") and container["resources"].get("limits"), where
        if doc["kind"] == "Deployment":
            assert pod.get("terminationGracePeriodSeconds"), f"{where}: terminationGracePeriodSeconds"
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{where}: selector matches"


def test_k8s_api_probes_point_at_real_routes(routes: dict[str, set[str]]) -> None:
    serving = [(w, pod, c) for w, pod, c in _our_containers() if container_argv(c)[1:2] == ["serve"]]
    assert serving, "some container serves the API"
    for where, _, container in serving:
        port = _serve_port(container_argv(container)[2:])
        ports = {p["containerPort"]: p.get("name") for p in container["ports"]}
        assert port in ports, f"{where}: containerPort {port} is what `serve --port` listens on"
        probes = {kind: container.get(kind) for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
        assert probes["readinessProbe"] and probes["livenessProbe"], f"{where}: both probes"
        assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for kind, probe in probes.items():
            if probe:
                _assert_get_route(routes, probe["httpGet"]["path"], f"{where} {kind}")
                assert probe["httpGet"]["port"] in (port, ports[port]), f"{where} {kind}: probes the served port"


def test_k8s_replicas() -> None:
    deployments = {doc["metadata"]["name"]: doc for _, doc in _of_kind("Deployment")}
    assert deployments["stripe-credits-api"]["spec"]["replicas"] >= 2
    assert 1 <= deployments["stripe-credits-worker"]["spec"]["replicas"] <= 2


def test_k8s_service_selects_the_api_pods() -> None:
    ((_, service),) = _of_kind("Service")
    api = next(d for _, d in _of_kind("Deployment") if d["metadata"]["name"] == "stripe-credits-api")
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    container = api["spec"]["template"]["spec"]["containers"][0]
    targets = {p.get("name") for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in targets


def test_k8s_commands_are_real() -> None:
    containers = list(_our_containers())
    assert containers
    for where, _, container in containers:
        calls = credits_calls(container_argv(container))
        assert calls, f"{where} runs no `credits` command"
        for args in calls:
            check_credits(args, where)


def test_k8s_migrations_run_once_in_a_job_not_in_every_replica() -> None:
    ((where, job),) = _of_kind("Job")
    assert job["spec"].get("parallelism", 1) == 1 and job["spec"].get("completions", 1) == 1
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert credits_calls(container_argv(container)) == [["migrate"]], where
    for where, doc, pod in _pod_specs():
        if doc["kind"] != "Job":
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                assert ["migrate"] not in credits_calls(container_argv(container)), f"{where} must not migrate"


def test_k8s_cronjobs() -> None:
    cronjobs = {doc["metadata"]["name"]: doc for _, doc in _of_kind("CronJob")}
    commands = {}
    for name, doc in cronjobs.items():
        assert doc["spec"]["concurrencyPolicy"] == "Forbid"
        (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        commands[name] = credits_calls(container_argv(container))
    assert commands["stripe-credits-reconcile"][0][0] == "reconcile"
    assert commands["stripe-credits-refill-free"][0][:2] == ["jobs", "refill-free"]
    _, hour, day, month, weekday = cronjobs["stripe-credits-reconcile"]["spec"]["schedule"].split()
    assert (day, month, weekday) == ("*", "*", "*") and hour.isdigit(), "reconcile: daily"
    _, hour, day, month, weekday = cronjobs["stripe-credits-refill-free"]["spec"]["schedule"].split()
    assert day.isdigit() and (month, weekday) == ("*", "*"), "refill-free: monthly"
    rules = cronjobs["stripe-credits-reconcile"]["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert any(r["action"] == "FailJob" and r["onExitCodes"]["values"] == [1] for r in rules), "findings: no retry"


def test_k8s_references_resolve_and_images_agree() -> None:
    secrets = {doc["metadata"]["name"]: doc for _, doc in _of_kind("Secret")}
    configmaps = {doc["metadata"]["name"]: doc for _, doc in _of_kind("ConfigMap")}
    images = set()
    for where, pod, container in _our_containers():
        images.add(container["image"])
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert refs and all(r in secrets for r in refs), f"{where}: envFrom the Secret {sorted(secrets)}"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("CREDITS_CONFIG"), f"{where}: CREDITS_CONFIG"
        assert set(env) <= SETTINGS_VARS, f"{where}: sets variables the service does not read"
        config = Path(env["CREDITS_CONFIG"])
        mounted = [
            m
            for m in container.get("volumeMounts", [])
            if "configMap" in volumes[m["name"]]
            and (config.parent == Path(m["mountPath"]) or config == Path(m["mountPath"]))
        ]
        assert mounted, f"{where}: CREDITS_CONFIG {config} lies in a mounted ConfigMap"
        cm_name = volumes[mounted[0]["name"]]["configMap"]["name"]
        assert cm_name in configmaps, f"{where}: ConfigMap {cm_name} is defined in deploy/k8s"
        key = mounted[0].get("subPath") or config.name
        assert key in configmaps[cm_name]["data"], f"{where}: the ConfigMap holds {key}"
    assert len(images) == 1, f"one image for every workload: {images}"


def test_k8s_secret_holds_what_the_service_needs() -> None:
    ((where, secret),) = _of_kind("Secret")
    keys = set(secret["stringData"])
    assert keys >= SECRET_KEYS, f"{where}: {SECRET_KEYS - keys} missing"
    assert keys <= SETTINGS_VARS, f"{where}: {keys - SETTINGS_VARS} is read by nothing"
    assert secret["stringData"]["CREDITS_API_TOKEN"] != secret["stringData"]["CREDITS_ADMIN_TOKEN"]


def test_k8s_configmap_catalogue_loads(tmp_path: Path) -> None:
    ((_, configmap),) = _of_kind("ConfigMap")
    path = tmp_path / "credits.toml"
    path.write_text(configmap["data"]["credits.toml"], encoding="utf-8")
    cat = catalogue.load(path)  # raises CatalogueError with the line on anything invalid
    assert cat.plans


# --- crontab and README -------------------------------------------------------------------------------


def _crontab_commands() -> list[str]:
    commands = []
    for raw in CRONTAB.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or re.match(r"[A-Za-z_]\w*\s*=", line):
            continue
        fields = line.split(None, 1 if line.startswith("@") else 5)
        commands.append(fields[-1])
    return commands


def test_crontab_commands_are_real() -> None:
    commands = _crontab_commands()
    assert commands
    found = []
    for command in commands:
        # cron turns an unescaped % into a newline (the rest becomes stdin): it would cut the command short.
        assert "%" not in command.replace("\\%", ""), f"crontab: unescaped % in {command!r}"
        for words in shell_commands(command.replace("\\%", "%")):
            if Path(words[0]).name == "credits":
                check_credits(words[1:], "deploy/crontab")
                found.append(words[1])
    assert {"reconcile", "jobs", "worker"} <= set(found)


DOCKER_RUN_VALUE_OPTIONS = {
    "--env-file",
    "-e",
    "--env",
    "-p",
    "--publish",
    "--name",
    "-v",
    "--volume",
    "--network",
    "-u",
    "--user",
    "-w",
    "--workdir",
    "--entrypoint",
    "-l",
    "--label",
    "--health-cmd",
}
COMPOSE_VALUE_OPTIONS = {
    "-f",
    "--file",
    "-p",
    "--project-name",
    "-e",
    "--env",
    "--name",
    "-v",
    "--volume",
    "-u",
    "--user",
    "-w",
    "--workdir",
    "--entrypoint",
    "-l",
    "--label",
    "--env-file",
}


def _after_options(words: list[str], value_options: set[str]) -> list[str]:
    """`words` from the first one that is not an option (or an option's value) on."""
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in value_options else 1
    return words[i:]


def readme_credits_calls(words: list[str]) -> list[list[str]]:
    """The `credits` arguments a README command line runs: directly, through `docker run IMAGE`, `docker
    compose run SERVICE` (the services' entrypoint is `credits`) or `kubectl exec … -- credits`."""
    if Path(words[0]).name == "credits":
        return [words[1:]]
    if words[:2] == ["docker", "run"]:
        rest = _after_options(words[2:], DOCKER_RUN_VALUE_OPTIONS)
        if rest and rest[0].startswith(IMAGE_PREFIX):
            return [rest[1:]] if len(rest) > 1 else []
    if words[:2] == ["docker", "compose"] and "run" in words:
        rest = _after_options(words[words.index("run") + 1 :], COMPOSE_VALUE_OPTIONS)
        service = _our_compose_services().get(rest[0]) if rest else None
        if service is not None and "entrypoint" not in service and len(rest) > 1:
            return [rest[1:]]
    if words[0] == "kubectl" and "--" in words:
        return credits_calls(words[words.index("--") + 1 :])
    return []


def test_readme_commands_are_what_the_image_runs() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, flags=re.S)
    assert blocks
    checked = []
    for block in blocks:
        for words in shell_commands(block):
            for args in readme_credits_calls(words):
                check_credits(args, "deploy/README.md")
                checked.append(args)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):  # inline `credits …`, `docker …`, `kubectl …`
        words = span.split()
        if words[0] in ("credits", "docker", "kubectl") and len(words) > 1 and "…" not in span:
            for command in shell_commands(span):
                for args in readme_credits_calls(command):
                    check_credits(args, f"deploy/README.md `{span}`")
                    checked.append(args)
    assert len(checked) >= 10, "the README shows how to run the image's commands"


# --- the helpers themselves ---------------------------------------------------------------------------


def test_check_credits_rejects_what_the_cli_rejects() -> None:
    check_credits(["reconcile", "--format", "markdown", "--since", "$(date -u -d '3 days ago' +%FT%T)"], "ok")
    check_credits(["jobs", "refill-free", "--month", "2026-03"], "ok")
    for bad in (
        ["reconcil"],
        ["jobs"],
        ["jobs", "refill"],
        ["reconcile", "--formt", "json"],
        ["reconcile", "--format", "pdf"],
        ["jobs", "refill-free", "--month", "2026-13"],
        ["serve", "--port", "x"],
    ):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_credits(bad, "bad")


def test_shell_commands_split_like_a_shell() -> None:
    script = (
        '. /etc/env && credits reconcile --format markdown >/dev/null 2>>/var/log/r.log || echo "exited $? (1; 2)"\n'
        "while :; do\n  X=1 credits jobs refill-free\n  sleep 86400 & wait $!\ndone"
    )
    assert shell_commands(script) == [
        [".", "/etc/env"],
        ["credits", "reconcile", "--format", "markdown"],
        ["echo", "exited $? (1; 2)"],
        [":"],
        ["credits", "jobs", "refill-free"],
        ["sleep", "86400"],
        ["wait", "$!"],
        ["done"],
    ]
