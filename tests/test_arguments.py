"""`kiln serve` flags: each with a help line and its default, each also from KILN_<FLAG> (how a
Kubernetes manifest sets them), Triton's names in Triton's units."""

from __future__ import annotations

import argparse

import pytest
from kiln.runtime.serve.arguments import add_serve_arguments, serve_options, take_environment


def _parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_arguments(parser)
    take_environment(parser, environ)
    return parser.parse_args(argv)


def test_every_flag_comes_from_the_environment_and_the_command_line_wins():
    environ = {
        "KILN_GRPC_PORT": "9001",
        "KILN_ACCESS_LOG": "true",
        "KILN_SPIN": "off",
        "KILN_NAME": "a, b",
        "KILN_PACKAGES": "/models/a,/models/b",
        "KILN_LOG_FORMAT": "json",
        "KILN_MAX_QUEUE_DELAY_MS": "0.5",
        "KILN_AUTH_TOKEN": "secret",
    }
    args = _parse([], environ)
    assert (args.grpc_port, args.access_log, args.spin, args.name) == (9001, True, False, ["a", "b"])
    assert args.packages == ["/models/a", "/models/b"] and args.log_format == "json"
    assert args.max_queue_delay_ms == 0.5 and serve_options(args).auth_token == "secret"
    assert _parse(["--grpc-port", "7001", "--no-access-log"], environ).grpc_port == 7001
    assert _parse(["--no-access-log"], environ).access_log is False


@pytest.mark.parametrize(
    "variable, value, needle",
    [("KILN_GRPC_PORT", "eighty", "KILN_GRPC_PORT='eighty': not a valid int"),
     ("KILN_ACCESS_LOG", "maybe", "KILN_ACCESS_LOG='maybe': expected one of"),
     ("KILN_LOG_FORMAT", "xml", "KILN_LOG_FORMAT='xml': choose from text, json")],
)  # fmt: skip
def test_a_bad_environment_value_is_an_error_that_names_the_variable(variable, value, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse([], {variable: value})
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_tritons_keepalive_flags_are_in_milliseconds_as_tritons():
    options = serve_options(_parse(["--grpc-keepalive-time", "7200000", "--grpc-keepalive-timeout", "20000"], {}))
    assert (options.keepalive_time, options.keepalive_timeout) == (7200.0, 20.0)


def test_help_has_a_line_and_the_default_for_every_flag():
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_arguments(parser)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags and all(a.help for a in flags), [a.dest for a in flags if not a.help]
    assert "(default: 8001)" in parser.format_help()


def test_frontends_take_a_count_or_auto_from_the_cpu_quota():
    from kiln.runtime.serve.arguments import frontend_count
    from kiln.runtime.session import cpu_count

    assert frontend_count("3") == 3 and frontend_count("0") == 0
    assert frontend_count("auto") == max(1, cpu_count() // 2)
    for bad in ("-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            frontend_count(bad)
