"""`appliance config check` catches what a config means (issue 16): limits, anomaly features,
faults, ranges, classes and zones against what their source really has; the files a config
names; every problem at its own line and column, in the product's words, with "did you mean";
YAML syntax errors with a hint; and a warning for a config that forwards nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config import ConfigError, ConfigErrors, check_config, config_schema, parse_config
from config.loader import receiver_config_schema
from config.words import PATTERN_WORDS
from tests.helpers import run_cli

HEAD = "appliance:\n  id: t-1\n  data_dir: /tmp/x\n"
SHORE = "sync:\n  destinations:\n    - {name: usb, type: directory, path: outbox}\n"
GEARBOX = (
    "sensors:\n"
    "  - name: gearbox\n"  # line 5
    "    type: simulated\n"
    "    sample_rate: 2000\n"
    "    channels:\n"
    "      - {name: vib_axial, signal: vibration}\n"  # line 9
    "      - {name: vib_radial, signal: vibration}\n"
)


def errors_of(text: str) -> list[ConfigError]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    error = caught.value
    return error.errors if isinstance(error, ConfigErrors) else [error]


def only_error(text: str) -> ConfigError:
    [error] = errors_of(text)
    return error


def where(error: ConfigError) -> tuple[str | None, int | None, int | None]:
    return error.key, error.line, error.column


def check(path: Path, *flags: str) -> tuple[int, str, str]:
    result = run_cli("config", "check", *flags, str(path))
    return result.returncode, result.stdout, result.stderr


# -------------------------------------------------------------- names against the source


def test_a_limit_on_a_channel_the_source_lacks_is_an_error_at_its_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        HEAD
        + GEARBOX
        + "    limits:\n"
        + "      - {feature: peak, channel: vib_radail, above: 2.0}\n"  # line 12
        + SHORE
    )
    code, _, err = check(config)  # the old check said `ok`, and the limit never fired
    assert code == 2, err
    assert (
        f"{config}:12:34: sensors[0].limits[0].channel: no channel 'vib_radail' in this source "
        "(did you mean 'vib_radial'?); its channels are vib_axial and vib_radial"
    ) in err


def test_limit_features_are_the_ones_the_source_computes() -> None:
    vibration = HEAD + GEARBOX + "    limits:\n      - {feature: slope, above: 1}\n"
    error = only_error(vibration)
    assert where(error) == ("sensors[0].limits[0].feature", 12, 19)
    assert "does not compute feature 'slope'" in error.message
    assert "vibration features: 2000 Hz" in error.message
    band = HEAD + GEARBOX + "    limits:\n      - {feature: band_0_10, above: 1}\n"
    assert "its bands (vibration features: 2000 Hz, kind auto) are band_0_62p5," in (
        only_error(band).message
    )
    assert parse_config(band.replace("band_0_10", "band_500_1000"), environ={})
    csv = HEAD + "sensors:\n  - {name: log, type: csv, path: /x.csv, limits: [{feature: crest}]}\n"
    error = only_error(csv.replace("feature: crest", "feature: crest, above: 3"))
    assert "a csv source has no regular sample rate" in error.message
    assert "are rms, peak, mean, min, max and slope" in error.message


def test_vibration_features_on_an_irregular_source_are_refused() -> None:
    text = (
        HEAD + "sensors:\n  - {name: log, type: csv, path: /x.csv, features: {kind: vibration}}\n"
    )
    error = only_error(text)
    assert error.key == "sensors[0].features.kind"
    assert "need a regular sample rate" in error.message and "use kind slow" in error.message


def test_anomaly_features_name_channels_and_features_the_source_has() -> None:
    text = (
        HEAD
        + GEARBOX
        + "    anomaly:\n"
        + "      method: hotelling\n"
        + "      features: [vib_axial.rms, vib_axal.peak, vib_radial.kurt, rms]\n"  # line 13
    )
    errors = errors_of(text)
    assert [where(e)[:2] for e in errors] == [
        ("sensors[0].anomaly.features[1]", 13),
        ("sensors[0].anomaly.features[2]", 13),
        ("sensors[0].anomaly.features[3]", 13),
    ]
    # Each at its own item of the one line.
    line = "      features: [vib_axial.rms, vib_axal.peak, vib_radial.kurt, rms]"
    assert [e.column for e in errors] == [
        line.index(item) + 1 for item in ("vib_axal.peak", "vib_radial.kurt", "rms]")
    ]
    assert "no channel 'vib_axal' in this source (did you mean 'vib_axial'?)" in errors[0].message
    assert "feature 'kurt' (did you mean 'kurtosis'?)" in errors[1].message
    assert "'rms' is not a `channel.feature` name" in errors[2].message


def test_live_sources_know_their_channels() -> None:
    mqtt_text = HEAD + (
        "sensors:\n"
        "  - name: reefers\n"
        "    type: mqtt\n"
        "    host: broker\n"
        "    topics:\n"
        "      - {topic: reefers/+/temp}\n"
        "      - {topic: engine/oil, channel: oil}\n"
        "    limits:\n"
        "      - {feature: max, channel: reefers.bay-3.temp, above: 1}\n"
        "      - {feature: max, channel: oil, above: 1}\n"
    )
    assert parse_config(mqtt_text, environ={})  # a wildcard's channels match its pattern
    error = only_error(mqtt_text.replace("channel: oil, above", "channel: oill, above"))
    assert "(did you mean 'oil'?)" in error.message
    assert "oil and reefers.*.temp (from reefers/+/temp)" in error.message
    nmea_text = HEAD + (
        "sensors:\n"
        "  - name: bridge\n"
        "    type: nmea\n"
        "    transport: udp\n"
        "    port: 10110\n"
        "    ranges: {water_temp: [-5, 40]}\n"
        "    limits:\n"
        "      - {feature: max, channel: xdr.C1, above: 1}\n"
    )
    error = only_error(nmea_text)
    assert where(error)[:2] == ("sensors[0].ranges.water_temp", 9)
    assert "range: no channel 'water_temp' in this source (did you mean 'water_temp_c'?)" in (
        error.message
    )
    listed = nmea_text.replace("port: 10110\n", "port: 10110\n    xdr: [C2]\n")
    assert "no channel 'xdr.C1'" in errors_of(listed)[-1].message


def test_classes_and_zones_are_checked_against_the_detector() -> None:
    text = HEAD + (
        "cameras:\n"
        "  - name: yard\n"
        "    url: builtin:bikes\n"
        "    classes: [person, motorcycle]\n"  # line 7
        "    blur_classes: [persons]\n"
        "    zones:\n"
        "      - {name: lane, polygon: [[0, 0], [1, 0], [1, 1]], classes: [person]}\n"
    )
    first, second = errors_of(text)
    assert where(first) == ("cameras[0].classes[1]", 7, 23)
    assert "class 'motorcycle' is not a label of model 'detector' (did you mean 'motorbike'?)" in (
        first.message
    )
    assert where(second)[:2] == ("cameras[0].blur_classes[0]", 8)
    zone = text.replace("classes: [person, motorcycle]", "classes: [car]").replace(
        "blur_classes: [persons]", "blur_classes: []"
    )
    error = only_error(zone)
    assert error.key == "cameras[0].zones[0].classes[0]"
    assert "zone 'lane' watches class 'person', which this camera's `classes` (car)" in (
        error.message
    )


def test_a_misspelt_model_name_gets_a_did_you_mean() -> None:
    text = (
        HEAD
        + "models:\n  front: {path: /m.onnx}\n"
        + ("cameras:\n  - {name: yard, url: builtin:bikes, model: frnt}\n")
    )
    error = only_error(text)
    assert where(error)[:2] == ("cameras[0].model", 7)
    assert "(did you mean 'front'?)" in error.message


# ---------------------------------------------------------------------- lines and columns


def test_a_repeated_source_name_is_reported_at_the_repeat() -> None:
    text = HEAD + (
        "sensors:\n"
        "  - {name: hull, type: csv, path: /a.csv}\n"
        "cameras:\n"
        "  - name: deck\n"
        "    url: builtin:bikes\n"
        "  - name: hull\n"  # line 9: the repeat (the old loader said line 1)
        "    url: builtin:bikes\n"
    )
    error = only_error(text)
    assert where(error) == ("cameras[1].name", 9, 11)
    assert "two sources are named 'hull' (the other is sensors[0].name)" in error.message


def test_several_problems_are_reported_together_in_file_order(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        HEAD
        + "storage:\n  keep_synced: a week\n  disk_budgit: 1GiB\n"  # lines 5, 6
        + "status:\n  listen: localhost\n"  # line 8
    )
    code, _, err = check(config)
    assert code == 2
    assert re.findall(rf"^(?:config error: )?{re.escape(str(config))}:(\d+:\d+): ", err, re.M) == [
        "5:16",
        "6:3",
        "8:11",
    ], err
    assert "must be HOST:PORT, e.g. 127.0.0.1:8080" in err.splitlines()[2]


def test_a_key_given_twice_is_an_error_at_the_second() -> None:
    error = only_error(HEAD + "storage:\n  disk_budget: 1GiB\n  disk_budget: 2GiB\n")
    assert where(error) == ("storage.disk_budget", 6, 3)
    assert "given twice in this section (first at line 5)" in error.message


# ------------------------------------------------------------------ the product's words


def test_messages_speak_of_allowed_values_not_of_the_validation_library() -> None:
    text = HEAD + GEARBOX + "    limits:\n      - {feature: peek, above: 2}\n"
    error = only_error(text)
    # The old message: `feature.literal['rms','peak',...]: Input should be ...` and
    # `feature.constrained-str: String should match pattern ...`, two errors for one slip.
    assert error.key == "sensors[0].limits[0].feature"
    assert "literal" not in str(error) and "constrained" not in str(error)
    assert "Input should be" not in str(error) and "String should" not in str(error)
    assert error.message.startswith("unknown feature 'peek' (did you mean 'peak'?)")
    assert "band_<low>_<high>" in error.message
    method = only_error(HEAD + GEARBOX + "    anomaly: {method: hotteling}\n")
    assert method.message == (
        "must be one of robust_z, ewma, hotelling, isolation_forest or autoencoder, not "
        "'hotteling' (did you mean 'hotelling'?)"
    )
    name = only_error(HEAD.replace("id: t-1", "id: 'ship 1'"))
    assert name.message == (
        "must be a name: a letter or digit, then up to 63 letters, digits, '.', '_' or '-', "
        "not 'ship 1'"
    )
    url = only_error(HEAD + "sync:\n  destinations:\n    - {name: s, type: http, url: shore}\n")
    assert "must be a URL that starts with http:// or https://" in url.message


def test_misspelt_keys_get_a_did_you_mean_or_the_keys_there_are() -> None:
    error = only_error(HEAD + GEARBOX + "    limts: []\n")
    assert where(error) == ("sensors[0].limts", 11, 5)
    assert error.message == "unknown key 'limts' (did you mean 'limits'?)"
    other = only_error(HEAD + "journal:\n  zzz: 1\n")
    assert other.message.startswith("unknown key 'zzz'; the keys here are checkpoint_interval,")


def test_every_pattern_in_the_schemas_is_told_in_words() -> None:
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                found.add(node["pattern"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config_schema())
    walk(receiver_config_schema())
    assert found and found <= set(PATTERN_WORDS), found - set(PATTERN_WORDS)


def test_receiver_config_errors_use_the_same_words(tmp_path: Path) -> None:
    config = tmp_path / "receiver.yaml"
    config.write_text("listen: 127.0.0.1:0\ndata: /srv/shore\ntokens_fil: /x\n")
    result = run_cli("receiver", "config", "check", str(config))
    assert result.returncode == 2
    assert f"{config}:3:1: tokens_fil: unknown key 'tokens_fil' (did you mean 'tokens_file'?)" in (
        result.stderr
    )


# ---------------------------------------------------------------------------------- YAML


def test_a_yaml_indentation_error_has_line_column_and_a_hint(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + "storage:\n  disk_budget: 1GiB\n   keep_synced: 7d\n")
    code, _, err = check(config)
    assert code == 2
    assert f"{config}:6:15: not valid YAML: a `:` where no key can start: this line is " in err
    assert "indented deeper than the keys beside it" in err
    assert "mapping values are not allowed here" not in err  # the parser's own words


@pytest.mark.parametrize(
    ("text", "at", "says"),
    [
        ("appliance:\n\tid: a\n", (2, 1), "a tab: YAML indents with spaces only"),
        ("appliance:\n  id: 'a\n  data_dir: /x\n", (2, 7), "a quote opened here is never closed"),
        ("appliance: {id: a, data_dir: /x\nstorage: {}\n", (1, 12), "a `{...}` mapping opened"),
        ("sensors:\n  - name: a\n    type: csv\n   - name: b\n", (4, 4), "indentation does not"),
        ("appliance:\n  id: a\n  data_dir\n", (3, 3), "this line is not `key: value`"),
        ("a: 1\n---\nb: 2\n", (2, 1), "a config is one document"),
        ("a: @x\n", (1, 4), "cannot start with '@' unless it is quoted"),
    ],
)
def test_yaml_syntax_errors_say_where_and_what_to_do(
    text: str, at: tuple[int, int], says: str
) -> None:
    error = only_error(text)
    assert (error.line, error.column) == at and error.message.startswith("not valid YAML: ")
    assert says in error.message


# ------------------------------------------------------------------------------- files


def shipping(token: Path, **http: str) -> str:
    extra = "".join(f", {key}: {value}" for key, value in http.items())
    return (
        "sync:\n  destinations:\n"
        f"    - {{name: shore, type: http, url: 'https://shore.example', token_file: {token}"
        f"{extra}}}\n"
    )


def test_a_missing_token_file_fails_the_check_unless_file_checks_are_skipped(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.yaml"
    missing = tmp_path / "shore.token"
    config.write_text(HEAD + shipping(missing))
    code, out, err = check(config)  # the old check said `ok`; the shipper failed at its start
    assert code == 2 and out == ""
    column = config.read_text().splitlines()[5].index(str(missing)) + 1
    assert (
        f"{config}:6:{column}: sync.destinations[0].token_file: token file {missing} does not exist"
    ) in err
    code, out, err = check(config, "--skip-file-checks")
    assert (code, err) == (0, "") and out.startswith(f"{config}: ok")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "is empty"),
        ("\n  \n", "is empty"),
        ("secret-one secret-two\n", "must hold one token; it holds 2 words"),
    ],
)
def test_token_files_must_hold_one_token_and_never_show_it(
    tmp_path: Path, content: str, says: str
) -> None:
    token = tmp_path / "shore.token"
    token.write_text(content)
    text = HEAD + shipping(token)
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigErrors) as caught:
        check_config(tmp_path / "c.yaml")
    [error] = caught.value.errors
    assert error.key == "sync.destinations[0].token_file" and says in error.message
    assert "secret-one" not in str(caught.value)


def test_files_that_are_no_files_and_certificates_and_status_tokens(tmp_path: Path) -> None:
    token = tmp_path / "shore.token"
    token.write_text("a-token\n")
    short = tmp_path / "status.token"
    short.write_text("abc\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        HEAD
        + f"status: {{listen: '0.0.0.0:8080', token_file: {short}}}\n"
        + shipping(token, ca_file=str(tmp_path), client_cert=str(tmp_path / "client.pem"))
    )
    with pytest.raises(ConfigErrors) as caught:
        check_config(config)
    assert [(e.key, e.message.split(str(tmp_path))[-1]) for e in caught.value.errors] == [
        ("status.token_file", "/status.token must hold a token of at least 16 characters"),
        ("sync.destinations[0].ca_file", " is not a regular file"),
        ("sync.destinations[0].client_cert", "/client.pem does not exist"),
    ]
    assert check_config(config, check_files=False).config.status.token_file == short


def test_labels_files_and_model_files_are_read_for_the_classes(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("boat\nbuoy\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        HEAD
        + f"models:\n  harbour: {{path: {tmp_path / 'm.onnx'}, labels_file: {labels}}}\n"
        + "cameras:\n  - {name: quay, url: '0', model: harbour, classes: [boat, bouy]}\n"
        + SHORE
    )
    with pytest.raises(ConfigErrors) as caught:
        check_config(config)
    model, klass = caught.value.errors
    assert model.key == "models.harbour.path" and "m.onnx does not exist" in model.message
    assert klass.key == "cameras[0].classes[1]"
    assert "class 'bouy' is not a label of model 'harbour' (did you mean 'buoy'?)" in klass.message
    assert check_config(config, check_files=False).warnings == ()


def test_secrets_are_never_shown_and_can_be_left_unread(tmp_path: Path) -> None:
    secret = tmp_path / "id.secret"
    secret.write_text("Hunter2 Is My Password\n")
    text = HEAD.replace("id: t-1", f"id: '${{file:{secret}}}'") + SHORE
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    assert caught.value.key == "appliance.id" and caught.value.line == 2
    assert f"the value read from secret file {str(secret)!r} is not valid here" in str(caught.value)
    assert "Hunter2" not in str(caught.value)
    secret.unlink()  # on the machine the config is for, it will be there
    checked = check_config(config, check_files=False)
    assert checked.unread == (str(secret),)


def test_a_non_loopback_status_page_without_a_token_fails_the_check(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + "status:\n  listen: 0.0.0.0:8080\n" + SHORE)
    code, _, err = check(config)  # the old check said `ok`; `run` then refused to start
    assert code == 2
    assert f"{config}:5:11: status.listen: the status page would listen on 0.0.0.0:8080" in err


# ------------------------------------------------------------------------------ warnings


def test_a_config_that_forwards_nowhere_gets_one_warning_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + GEARBOX)
    code, out, err = check(config)
    assert code == 0 and out.startswith(f"{config}: ok")
    [line] = err.splitlines()
    assert line.startswith(f"{config}: warning: records are journalled but forwarded nowhere")
    config.write_text(HEAD + GEARBOX + SHORE)
    assert check(config)[2] == ""
