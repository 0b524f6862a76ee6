"""The deployment artifacts: Dockerfile, docker-compose.yml, the README's ``docker run`` recipe,
deploy/kubernetes/, deploy/grafana/, and the two CLI pieces they run (``nextproxy pki`` and
``nextproxy standins``). tests/test_demo_cli.py runs ``--owner``, ``--keep-pki`` and the
role-aware healthcheck for real.

No container engine, cluster or network here: the YAML is read with a small reader for the plain
subset these files are written in (PyYAML is not a dependency), which refuses anything outside
it, and the configuration they carry is loaded with nextproxy's own loaders. The CLI tests run
real processes on loopback, each bounded in time.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.metrics import MetricWrapperBase

from nextproxy import cli
from nextproxy.process import metrics
from nextproxy.config.preset import PRESET_API_ROUTES, PRESET_PATH_ROUTES
from nextproxy.config import from_environment, from_toml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
IMAGE_GID = 10001
KUBERNETES = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "nextproxy-dashboard.json"
STANDIN_SERVICES = ("ns", "mc", "sfs")
PROCESS_TIMEOUT = 15.0


# --------------------------------------------------------------------------- a YAML subset reader

# Block mappings and sequences, "|" / "|-" literals, plain or quoted scalars, JSON-style flow
# collections, "---" between documents. Anything else (anchors, tags, folded scalars, tabs,
# YAML 1.1's yes/no/on/off, octal-looking numbers) is refused rather than guessed at.
_KEY = re.compile(r'^(?P<key>"[^"\\]*"|[A-Za-z0-9_.\-/]+)\s*:(?:\s+(?P<rest>.*))?$')
_AMBIGUOUS = {"yes", "no", "on", "off", "y", "n", "true", "false", "null", "~"}


class YamlSubsetError(ValueError):
    pass


def _strip_comment(text: str) -> str:
    quote = ""
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1] in " \t"):
            return text[:index].rstrip()
    return text


def _scalar(text: str, where: str) -> Any:
    text = _strip_comment(text).strip()
    if text.startswith('"') or text.startswith("[") or text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise YamlSubsetError(f"{where}: not JSON-compatible: {text!r} ({exc})") from None
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise YamlSubsetError(f"{where}: unterminated quote: {text!r}")
        return text[1:-1].replace("''", "'")
    if text in ("true", "false"):
        return text == "true"
    if text in ("", "null"):
        return None
    if re.fullmatch(r"-?(0|[1-9]\d*)", text):
        return int(text)
    if re.fullmatch(r"-?(0|[1-9]\d*)\.\d+", text):
        return float(text)
    if text.lower() in _AMBIGUOUS or re.fullmatch(r"-?0\d+", text):
        raise YamlSubsetError(f"{where}: {text!r} means different things to YAML 1.1 and 1.2: quote it")
    if text[0] in "&*!|>%@`" or ": " in text or text.endswith(":"):
        raise YamlSubsetError(f"{where}: outside the subset: {text!r}")
    return text


class _Reader:
    def __init__(self, text: str, name: str) -> None:
        self.lines = text.split("\n")
        self.name = name
        self.i = 0

    def where(self) -> str:
        return f"{self.name}:{self.i + 1}"

    def peek(self) -> tuple[int, str] | None:
        """(indent, content) of the next meaningful line, without consuming it."""
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            content = raw.strip()
            if content and not content.startswith("#"):
                lead = raw[: len(raw) - len(raw.lstrip())]
                if "\t" in lead:
                    raise YamlSubsetError(f"{self.where()}: tab in indentation")
                return len(lead), content
            self.i += 1
        return None

    def documents(self) -> list[Any]:
        documents = []
        while (line := self.peek()) is not None:
            if line[1] == "---":
                self.i += 1
                continue
            if line[0] != 0:
                raise YamlSubsetError(f"{self.where()}: a document must start at column 0")
            documents.append(self.block(0))
        return documents

    def block(self, indent: int) -> Any:
        line = self.peek()
        assert line is not None
        return self.sequence(indent) if _is_item(line[1]) else self.mapping(indent)

    def mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (line := self.peek()) is not None and line[0] == indent and line[1] != "---":
            if _is_item(line[1]):
                raise YamlSubsetError(f"{self.where()}: a sequence item where a key was expected")
            match = _KEY.match(line[1])
            if match is None:
                raise YamlSubsetError(f"{self.where()}: not a 'key: value' line: {line[1]!r}")
            key = match["key"]
            key = json.loads(key) if key.startswith('"') else key
            if key in result:
                raise YamlSubsetError(f"{self.where()}: duplicate key {key!r}")
            self.i += 1
            result[key] = self.value(match["rest"] or "", indent)
        if line is not None and line[0] > indent:
            raise YamlSubsetError(f"{self.where()}: unexpected indentation")
        return result

    def value(self, rest: str, indent: int) -> Any:
        rest = _strip_comment(rest).strip()
        if rest in ("|", "|-"):
            return self.literal(indent, keep_newline=rest == "|")
        if rest:
            return _scalar(rest, self.where())
        line = self.peek()
        if line is None or line[0] <= indent:
            return None
        return self.block(line[0])

    def sequence(self, indent: int) -> list[Any]:
        result: list[Any] = []
        while (line := self.peek()) is not None and line[0] == indent and _is_item(line[1]):
            rest = line[1][1:].lstrip()
            if not rest:
                self.i += 1
                result.append(self.value("", indent))
            elif _KEY.match(rest):
                # "- key: value" opens a mapping whose keys line up with this first one.
                item_indent = indent + len(line[1]) - len(rest)
                self.lines[self.i] = " " * item_indent + rest
                result.append(self.mapping(item_indent))
            else:
                self.i += 1
                result.append(_scalar(rest, self.where()))
        if line is not None and line[0] > indent:
            raise YamlSubsetError(f"{self.where()}: unexpected indentation")
        return result

    def literal(self, indent: int, *, keep_newline: bool) -> str:
        body: list[str] = []
        content_indent = None
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            if raw.strip():
                lead = len(raw) - len(raw.lstrip(" "))
                if lead <= indent:
                    break
                content_indent = lead if content_indent is None else content_indent
                if lead < content_indent:
                    raise YamlSubsetError(f"{self.where()}: literal line less indented than its first")
                body.append(raw[content_indent:])
            else:
                body.append("")
            self.i += 1
        while body and not body[-1]:
            body.pop()
        return "\n".join(body) + ("\n" if keep_newline and body else "")


def _is_item(content: str) -> bool:
    return content == "-" or content.startswith("- ")


def read_yaml(path: Path) -> list[Any]:
    return _Reader(path.read_text(encoding="utf-8"), path.name).documents()


def test_yaml_subset_reader_reads_what_it_claims_and_refuses_the_rest() -> None:
    text = (
        "# comment\na:\n  b: 1\n  c: \"x: y\"  # trailing\n  d:\n    - e: [\"f\", \"g\"]\n"
        "      h: 2.5\n    - plain/str:ing\n  lit: |\n    one\n\n    two\n---\nz: -3\n"
    )
    assert _Reader(text, "t").documents() == [
        {"a": {"b": 1, "c": "x: y", "d": [{"e": ["f", "g"], "h": 2.5}, "plain/str:ing"], "lit": "one\n\ntwo\n"}},
        {"z": -3},
    ]
    for bad in ("a: yes\n", "a: 0440\n", "a: &x 1\n", "a: >\n  b\n", "a: b: c\n", "a:\n\t- b\n", "a: 1\na: 2\n"):
        with pytest.raises(YamlSubsetError):
            _Reader(bad, "t").documents()


# --------------------------------------------------------------------------- helpers


def _duration_seconds(text: str) -> float:
    """Compose durations such as "40s", "1m30s"."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _with_pki_paths(env: dict[str, str], files: dict[str, Path]) -> dict[str, str]:
    """The same variables with every certificate path pointed at a real demo PKI file."""
    replacements = {"edge.pem": "edge.pem", "edge.key": "edge.key", "tls.crt": "edge.pem", "tls.key": "edge.key"}
    out = {}
    for key, value in env.items():
        if key.endswith("_FILE"):
            out[key] = str(files[replacements[Path(value).name]])
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    [document] = read_yaml(COMPOSE)
    assert isinstance(document, dict)
    return document


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_has_the_proxy_the_standins_and_the_pki_from_one_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"nextproxy", "ns", "mc", "sfs", "pki"}
    proxy = services["nextproxy"]
    assert proxy["build"]["context"] == "."
    assert (ROOT / proxy["build"]["context"] / "Dockerfile").is_file()
    image = proxy["image"]
    for name in ("ns", "mc", "sfs", "pki"):
        assert services[name]["image"] == image, name
        assert "build" not in services[name], f"{name} must reuse the image nextproxy builds"
        assert services[name]["pull_policy"] == "never", f"{name}: the image is local, never pulled"
    assert proxy["pull_policy"] == "build"
    for name in STANDIN_SERVICES:
        command = services[name]["command"]
        assert command[:3] == ["standins", "--service", name]
        # What the service runs must be accepted by the real parser.
        cli._parser().parse_args(command)
    assert "nextproxy pki /certs" in " ".join(services["pki"]["entrypoint"])


def test_compose_pki_hands_the_files_to_the_project_owner_and_the_image_group(compose: dict[str, Any]) -> None:
    pki = compose["services"]["pki"]
    assert pki["user"] == "0:0", "root, to write into ./certs whoever created it"
    entrypoint = pki["entrypoint"]
    assert entrypoint[:2] == ["sh", "-c"]
    words = shlex.split(entrypoint[2])
    assert words[:2] == ["exec", "nextproxy"]
    owner = words[words.index("--owner") + 1]
    # "$$" is compose's escape: the shell sees "$(stat -c %u /project)", the project folder's owner.
    assert owner == f"$$(stat -c %u /project):{IMAGE_GID}"
    assert ".:/project:ro" in pki["volumes"]
    args = cli._parser().parse_args(words[2:])
    assert (args.command, args.dir, args.owner) == ("pki", "/certs", owner)


def test_compose_env_is_a_valid_preset_with_passthrough_api_names(
    compose: dict[str, Any], pki_files: dict[str, Path]
) -> None:
    env = compose["services"]["nextproxy"]["environment"]
    assert all(isinstance(value, str) for value in env.values()), "compose wants strings in environment"
    config = from_environment(_with_pki_paths(env, pki_files))
    hosts = {name: {s.host for s in config.upstream(name).servers} for name, *_ in PRESET_PATH_ROUTES}
    assert hosts == {"ns-websocket": {"ns"}, "ns-sigmai": {"ns"}, "mc-sigmai": {"mc"}, "sfs-sigmai": {"sfs"}}
    sni = {route.name: (route.server_names, route.action.value) for route in config.sni_routes}
    assert sni == {
        "ns-api": (("ns-api.localhost",), "passthrough"),
        "mc-api": (("mc-api.localhost",), "passthrough"),
    }


def test_compose_mounts_certificates_read_only_where_the_file_variables_point(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["nextproxy"]["environment"]
    mounts = [volume.split(":") for volume in services["nextproxy"]["volumes"]]
    read_only = {target for source, target, *mode in mounts if mode == ["ro"]}
    for key in ("NEXTPROXY_TLS_CERTIFICATE_FILE", "NEXTPROXY_TLS_KEY_FILE"):
        assert str(Path(env[key]).parent) in read_only, key
    pki_source, pki_target = services["pki"]["volumes"][0].split(":")[:2]
    assert pki_target == "/certs"
    assert any(source == pki_source for source, *_ in mounts)
    for name in ("ns", "mc"):
        pki_dir = services[name]["command"][services[name]["command"].index("--pki") + 1]
        assert f"{pki_source}:{pki_dir}:ro" in services[name]["volumes"]


def test_compose_publishes_ports_checks_readiness_and_outwaits_the_drain(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["nextproxy"]
    assert {"8443:8443", "9613:9613"} <= set(proxy["ports"])
    test = proxy["healthcheck"]["test"]
    # `nextproxy healthcheck` GETs /readyz on the configured admin address (tests/test_cli.py).
    assert test == ["CMD", "nextproxy", "healthcheck"]
    assert proxy["init"] is True
    env = proxy["environment"]
    drain = float(env["NEXTPROXY_DRAIN_TIMEOUT"]) + float(env["NEXTPROXY_SHUTDOWN_DELAY"])
    assert _duration_seconds(proxy["stop_grace_period"]) > drain


def test_compose_startup_order_and_standin_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    depends = services["nextproxy"]["depends_on"]
    assert depends["pki"]["condition"] == "service_completed_successfully"
    for name in STANDIN_SERVICES:
        assert depends[name]["condition"] == "service_healthy"
        standin = services[name]
        assert standin["init"] is True
        # No override: the image's `nextproxy healthcheck` sees that it runs the stand-ins and
        # probes their ports (tests/test_demo_cli.py runs it against real stand-ins).
        assert "healthcheck" not in standin, name
    assert _instruction(_stages()[-1], "HEALTHCHECK").endswith('CMD ["nextproxy", "healthcheck"]')
    for name in ("ns", "mc"):
        assert services[name]["depends_on"]["pki"]["condition"] == "service_completed_successfully"


# --------------------------------------------------------------------------- Dockerfile


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as (INSTRUCTION, arguments) per stage, continuation lines joined."""
    stages: list[list[tuple[str, str]]] = []
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            if keyword.upper() == "FROM":
                stages.append([])
            stages[-1].append((keyword.upper(), " ".join(rest.split())))
    return stages


def _instruction(stage: list[tuple[str, str]], keyword: str) -> str:
    [value] = [rest for key, rest in stage if key == keyword]
    return value


def test_image_is_multi_stage_and_ships_only_the_installed_venv() -> None:
    *builders, final = _stages()
    assert builders, "a build stage, so the final image holds no source or build leftovers"
    build_name = _instruction(builders[-1], "FROM").split()[-1]
    build_runs = " ".join(rest for key, rest in builders[-1] if key == "RUN")
    # pip runs in a venv, so it never warns about root; the wheel is built, then installed.
    assert "python -m venv /opt/venv" in build_runs
    assert "/opt/venv/bin/pip wheel" in build_runs and "/opt/venv/bin/pip install /wheels/" in build_runs
    copies = [rest for key, rest in final if key in ("COPY", "ADD")]
    assert copies == [f"--from={build_name} /opt/venv /opt/venv"], "nothing but the venv reaches the image"
    assert not any("pip" in rest for key, rest in final if key == "RUN")
    assert "PATH=/opt/venv/bin:$PATH" in _instruction(final, "ENV")
    # `python -m nextproxy` from the working directory must find the installed package, not a copy.
    assert _instruction(final, "WORKDIR") == "/"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")}
    assert {"tests", "benchmarks", ".git", "*.egg-info", "build", "certs"} <= ignored, "no keys in the build context"


def test_image_runs_as_10001_stops_with_sigterm_and_checks_its_role() -> None:
    final = _stages()[-1]
    assert _instruction(final, "USER") == f"10001:{IMAGE_GID}"
    assert f"groupadd --gid {IMAGE_GID}" in _instruction(final, "RUN")
    assert _instruction(final, "STOPSIGNAL") == "SIGTERM"
    assert _instruction(final, "ENTRYPOINT") == '["nextproxy"]'
    assert _instruction(final, "CMD") == '["run"]'
    # One check for every role: `nextproxy healthcheck` looks at what the container runs.
    healthcheck = _instruction(final, "HEALTHCHECK")
    assert healthcheck.endswith('CMD ["nextproxy", "healthcheck"]')
    assert cli._parser().parse_args(["healthcheck"]).command == "healthcheck"
    text = DOCKERFILE.read_text()
    assert "--stop-timeout 40" in text, "the stop timeout a Dockerfile cannot set is documented in it"


# --------------------------------------------------------------------------- README: docker run


def _readme_docker_run() -> tuple[str, list[list[str]]]:
    """The README's "Docker without compose" section and each `docker run` in its recipe, as argv.

    The recipe's one loop (``for s in ns mc sfs``) is unrolled, so every container it starts is
    checked.
    """
    section = README.read_text().split("### Docker without compose", 1)[1].split("\n### ", 1)[0]
    script = section.split("```sh\n", 1)[1].split("```", 1)[0]
    script = re.sub(r"\\\n\s*", " ", script)
    commands: list[list[str]] = []
    loop = None
    for line in script.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("for s in "):
            loop = line.removeprefix("for s in ").removesuffix("; do").split()
        elif line == "done":
            loop = None
        elif line.startswith("docker run"):
            for value in loop or [""]:
                commands.append(shlex.split(line.replace('"$s"', value)))
    return section, commands


def _split_run(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """docker run options (name -> values; flags map to []) and the arguments after the image."""
    image = argv.index("nextproxy:local")
    options: dict[str, list[str]] = {}
    words = argv[2:image]
    index = 0
    flags = {"-d", "--rm", "--init", "--read-only"}
    while index < len(words):
        word = words[index]
        if word in flags:
            options.setdefault(word, [])
            index += 1
        else:
            options.setdefault(word, []).append(words[index + 1])
            index += 2
    return options, argv[image + 1 :]


def test_readme_docker_run_recipe_parses_and_outwaits_the_drain(pki_files: dict[str, Path]) -> None:
    section, commands = _readme_docker_run()
    runs = [_split_run(argv) for argv in commands]
    # No arguments after the image: its CMD, ["run"].
    runs = [(options, args or ["run"]) for options, args in runs]
    assert [args[0] for _, args in runs] == ["pki", "standins", "standins", "standins", "run"]
    for _, args in runs:
        cli._parser().parse_args(args)  # every container's command is one the real CLI accepts
    (pki_options, pki_args), *standins, (proxy, proxy_args) = runs
    # The pki step: root, so the bind mount's owner does not matter; files handed to the caller.
    assert pki_options["--user"] == ["0:0"]
    assert pki_args[pki_args.index("--owner") + 1] == f"$(id -u):{IMAGE_GID}"
    assert {f"{s[0]['--name'][0]}" for s in standins} == set(STANDIN_SERVICES)
    for options, args in standins:
        assert args[args.index("--service") + 1] == options["--name"][0]
        assert "--init" in options
    # The proxy: init, certificates by *_FILE from a read-only mount, a stop timeout over the drain.
    assert "--init" in proxy and "--read-only" in proxy
    env = dict(item.split("=", 1) for item in proxy["-e"])
    mounts = {volume.split(":")[1]: volume.split(":")[2:] for volume in proxy["-v"]}
    for key in ("NEXTPROXY_TLS_CERTIFICATE_FILE", "NEXTPROXY_TLS_KEY_FILE"):
        assert mounts[str(Path(env[key]).parent)] == ["ro"], key
    config = from_environment(_with_pki_paths(env, pki_files))
    assert {route.name for route in config.sni_routes} == {"ns-api", "mc-api"}
    drain = config.timeouts.shutdown_delay + config.timeouts.drain
    assert int(proxy["--stop-timeout"][0]) > drain
    assert {"8443:8443", "9613:9613"} == set(proxy["-p"])
    for words in ("STOPSIGNAL", "--stop-timeout", "X-Forwarded-For", "bridge gateway", "--network host"):
        assert words in section, words


# --------------------------------------------------------------------------- deploy/kubernetes


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, for every resource the kustomization lists."""
    [kustomization] = read_yaml(KUBERNETES / "kustomization.yaml")
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for document in read_yaml(KUBERNETES / resource):
            key = (document["kind"], document["metadata"]["name"])
            assert key not in objects, key
            objects[key] = document
    return objects


def _container(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    [container] = manifests[("Deployment", "nextproxy")]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _preset_env(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    container = _container(manifests)
    [source] = container["envFrom"]
    env = dict(manifests[("ConfigMap", source["configMapRef"]["name"])]["data"])
    env.update({item["name"]: item["value"] for item in container["env"]})
    return env


def test_kustomization_lists_every_manifest_but_the_secret_example(
    manifests: dict[tuple[str, str], dict[str, Any]]
) -> None:
    kinds = {kind for kind, _ in manifests}
    assert kinds == {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}
    listed = set(read_yaml(KUBERNETES / "kustomization.yaml")[0]["resources"])
    on_disk = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - listed == {"secret.example.yaml"}


def test_secret_example_is_a_tls_secret_with_placeholders_only() -> None:
    [secret] = read_yaml(KUBERNETES / "secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["type"] == "kubernetes.io/tls"
    assert set(secret["stringData"]) == {"tls.crt", "tls.key"}
    for value in secret["stringData"].values():
        # No base64 body line: nothing that could be a real key or certificate.
        body = [line for line in value.splitlines() if not line.startswith("-----")]
        assert body and all(line.startswith("REPLACE-") for line in body)


def test_deployment_probes_security_and_resources(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = manifests[("Deployment", "nextproxy")]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    container = _container(manifests)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"https": 8443, "admin": 9613}
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path and ports[http["port"]] == 9613
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def test_grace_period_outlasts_shutdown_delay_plus_drain(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = manifests[("Deployment", "nextproxy")]["spec"]["template"]["spec"]
    env = _preset_env(manifests)
    assert env["NEXTPROXY_SHUTDOWN_DELAY"] == "5"
    drain = float(env["NEXTPROXY_SHUTDOWN_DELAY"]) + float(env["NEXTPROXY_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain
    assert "lifecycle" not in _container(manifests), "no preStop hook: the shutdown delay does its job"
    [toml_text] = manifests[("ConfigMap", "nextproxy-config")]["data"].values()
    timeouts = re.search(r"\[timeouts\]\n(.*?)(?:\n\[|\Z)", toml_text, re.S).group(1)  # type: ignore[union-attr]
    values = dict(re.findall(r"^(\w+) = (\d+)", timeouts, re.M))
    assert pod["terminationGracePeriodSeconds"] > int(values["shutdown_delay"]) + int(values["drain"])


def test_certificate_secret_is_mounted_where_the_file_variables_point(
    manifests: dict[tuple[str, str], dict[str, Any]]
) -> None:
    pod = manifests[("Deployment", "nextproxy")]["spec"]["template"]["spec"]
    container = _container(manifests)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    env = _preset_env(manifests)
    for key, file_name in (("NEXTPROXY_TLS_CERTIFICATE_FILE", "tls.crt"), ("NEXTPROXY_TLS_KEY_FILE", "tls.key")):
        path = Path(env[key])
        assert path.name == file_name  # the keys of a kubernetes.io/tls Secret
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"]["secretName"] == "nextproxy-tls"
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] is not None  # writable scratch on a read-only root


def test_configmap_preset_loads_with_the_real_loader(
    manifests: dict[tuple[str, str], dict[str, Any]], pki_files: dict[str, Path]
) -> None:
    env = _preset_env(manifests)
    assert all(isinstance(value, str) for value in env.values())
    config = from_environment(_with_pki_paths(env, pki_files))
    assert config.timeouts.shutdown_delay == 5 and config.timeouts.drain == 30
    assert {route.name for route in config.sni_routes} == {name for name, *_ in PRESET_API_ROUTES}


def test_toml_configmap_loads_and_routes_like_the_preset(
    manifests: dict[tuple[str, str], dict[str, Any]], pki_files: dict[str, Path], tmp_path: Path
) -> None:
    [toml_text] = manifests[("ConfigMap", "nextproxy-config")]["data"].values()
    mount = _container(manifests)["env"]
    tls_dir = str(Path(next(item["value"] for item in mount if item["name"] == "NEXTPROXY_TLS_CERTIFICATE_FILE")).parent)
    toml_text = toml_text.replace(f"{tls_dir}/tls.crt", str(pki_files["edge.pem"]))
    toml_text = toml_text.replace(f"{tls_dir}/tls.key", str(pki_files["edge.key"]))
    path = tmp_path / "nextproxy.toml"
    path.write_text(toml_text)
    from_file = from_toml(str(path), {})
    preset = from_environment(_with_pki_paths(_preset_env(manifests), pki_files))

    def routing(config: Any) -> Any:
        return (
            sorted((r.name, r.prefix, tuple(map(str, config.upstream(r.upstream).servers))) for r in config.routes),
            sorted((r.name, r.server_names, r.action, tuple(map(str, config.upstream(r.upstream).servers))) for r in config.sni_routes),
            config.timeouts,
        )

    assert routing(from_file) == routing(preset)


def test_services_and_disruption_budget_select_the_pods(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    labels = manifests[("Deployment", "nextproxy")]["spec"]["template"]["metadata"]["labels"]
    ports = {port["name"]: port["containerPort"] for port in _container(manifests)["ports"]}
    edge = manifests[("Service", "nextproxy")]["spec"]
    admin = manifests[("Service", "nextproxy-admin")]["spec"]
    for service in (edge, admin):
        assert service["selector"].items() <= labels.items()
    assert [(p["port"], ports[p["targetPort"]]) for p in edge["ports"]] == [(443, 8443)]
    assert [(p["port"], ports[p["targetPort"]]) for p in admin["ports"]] == [(9613, 9613)]
    assert admin["type"] == "ClusterIP", "metrics and the status page must not face the internet"
    pdb = manifests[("PodDisruptionBudget", "nextproxy")]["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


# --------------------------------------------------------------------------- deploy/grafana


def _metric_labels() -> dict[str, tuple[str, ...]]:
    """Exposed series name -> label names, from the metric objects themselves."""
    out: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name, kind, labels = value._name, value._type, value._labelnames
            if kind == "counter":
                out[name + "_total"] = labels
            elif kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    out[name + suffix] = labels + (("le",) if suffix == "_bucket" else ())
            else:
                out[name] = labels
    return out


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_charts_every_contract_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(target["expr"] for _, target in _targets(dashboard))
    used = set(re.findall(r"\bnextproxy_\w+", exprs))
    for name in metrics.CONTRACT_METRIC_NAMES:
        assert any(series == name or series.startswith(name + "_") for series in used), name
    for name in ("nextproxy_request_duration_seconds", "nextproxy_websocket_session_duration_seconds"):
        quantiles = re.findall(rf"histogram_quantile\((0\.\d+), [^;]*?{name}_bucket", exprs)
        assert quantiles, name
    assert {"0.5", "0.95", "0.99"} <= set(re.findall(r"histogram_quantile\((0\.\d+), [^;]*?nextproxy_request_duration", exprs))


def test_dashboard_queries_use_real_labels_and_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [datasource] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    reference = "${" + datasource["name"] + "}"
    known = _metric_labels()
    extra = {"job", "instance"}  # added by Prometheus at scrape time
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel, target in _targets(dashboard):
        assert panel["datasource"]["uid"] == reference and target["datasource"]["uid"] == reference
        expr = target["expr"]
        depth = 0
        for char in expr:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, expr
        assert depth == 0 and expr.count("{") == expr.count("}") and expr.count("[") == expr.count("]"), expr
        series = set(re.findall(r"\bnextproxy_\w+", expr))
        if not series:
            continue
        labels = set().union(*(known[name] for name in series)) | extra
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            grouped = {label.strip() for label in group.split(",")}
            assert grouped <= labels, (panel["title"], grouped - labels)
        for legend_label in re.findall(r"\{\{(\w+)\}\}", target["legendFormat"]):
            assert legend_label in labels, (panel["title"], legend_label)


def test_dashboard_layout_fits_the_grid_without_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells


# --------------------------------------------------------------------------- nextproxy pki / standins


def test_pki_writes_the_demo_pki_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "certs"
    assert cli.main(["pki", str(folder)]) == 0
    names = {"ca", "edge", "upstream", "client"}
    assert {path.name for path in folder.iterdir()} == {n + s for n in names for s in (".pem", ".key")}
    for name in names:
        assert (folder / f"{name}.key").stat().st_mode & 0o077 == 0, "keys are private to their owner"
    edge = x509.load_pem_x509_certificate((folder / "edge.pem").read_bytes())
    sans = edge.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(sans.get_values_for_type(x509.DNSName))
    assert {"localhost", "nextproxy", "ns-api.localhost", "mc-api.localhost"} <= dns
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    out = capsys.readouterr().out
    assert str(folder / "edge.pem") in out and "nextproxy" in out
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert cli.main(["pki", str(folder)]) == 0
    assert "left unchanged" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_pki_certificates_cover_the_names_compose_uses(compose: dict[str, Any], tmp_path: Path) -> None:
    assert cli.main(["pki", str(tmp_path)]) == 0
    env = compose["services"]["nextproxy"]["environment"]

    def dns_names(name: str) -> set[str]:
        certificate = x509.load_pem_x509_certificate((tmp_path / name).read_bytes())
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return set(sans.get_values_for_type(x509.DNSName))

    # Passthrough: clients verify the stand-ins' upstream.pem for the API names, the edge for the rest.
    api_names = {env["NEXTPROXY_NS_API_SNI"], env["NEXTPROXY_MC_API_SNI"]}
    assert api_names <= dns_names("upstream.pem")
    assert {"localhost", "nextproxy"} <= dns_names("edge.pem")


def test_standins_all_with_one_host_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["standins", "--service", "all", "--host", "127.0.0.5"]) == cli.EXIT_CONFIG
    assert capsys.readouterr().err.startswith("nextproxy: --host: ")


def _start_standins(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "nextproxy", "standins", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def _wait_for_port(process: subprocess.Popen[bytes], host: str, port: int) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"standins exited early: {process.communicate()[0].decode()}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listened on {host}:{port} within {PROCESS_TIMEOUT} s")


def _stop(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return process.returncode, output.decode()


def _get(host: str, port: int, path: str, context: ssl.SSLContext | None = None, server_name: str = "") -> dict[str, Any]:
    with socket.create_connection((host, port), timeout=5) as raw:
        sock: socket.socket = context.wrap_socket(raw, server_hostname=server_name) if context else raw
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name or host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return dict(json.loads(body))


def test_standins_sfs_serves_until_sigterm_then_exits_0() -> None:
    process = _start_standins("--service", "sfs", "--host", "127.0.0.5")
    try:
        _wait_for_port(process, "127.0.0.5", 8888)
        assert _get("127.0.0.5", 8888, "/sfs/sigmai/x")["service"] == "sfs-sigmai"
    finally:
        code, output = _stop(process)
    assert code == 0, output
    assert "sfs-sigmai on http+ws://127.0.0.5:8888" in output


def test_standins_ns_serves_its_tls_api_with_the_pki_dir(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    assert cli.main(["pki", str(folder)]) == 0
    process = _start_standins("--service", "ns", "--host", "127.0.0.6", "--pki", str(folder))
    try:
        for port in (9999, 8888, 8080):
            _wait_for_port(process, "127.0.0.6", port)
        context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
        context.load_cert_chain(folder / "client.pem", folder / "client.key")
        report = _get("127.0.0.6", 8080, "/who", context, "ns-api.localhost")
        assert report["service"] == "ns-api"
        assert report["tls"]["server_name"] == "ns-api.localhost"
        assert report["tls"]["client_cert_subject"] == "CN=demo-client"
        assert _get("127.0.0.6", 9999, "/ns/websocket")["service"] == "ns-websocket"
    finally:
        code, output = _stop(process)
    assert code == 0, output
