"""`federated:` template section: a valid one loads; each malformed one says field, value, fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from arf_training.errors import TemplateError
from arf_training.templates import json_schema, parse_template

REPO = Path(__file__).resolve().parents[2]
BASE = (REPO / "config_templates" / "reach_bc.yaml").read_text().replace(
    "procs_per_node: 2", "procs_per_node: 1").replace("name: reach_bc\n", "name: reach_fed\n")
FEDERATED = """
federated:
  sites:
    - {name: north, hub: sites/north/datahub}
    - {name: south, hub: /data/south/datahub, query: "SELECT * FROM reach_demos"}
    - {name: east, hub: "file:///data/east/datahub"}
  rounds: 3
  strategy: fedavg
  fraction_fit: 1.0
  min_sites: 2
  local_epochs: 2
"""


def _template(section: str = FEDERATED, base: str = BASE):
    return parse_template(base + section, "fed.yaml")


def _edit(old: str, new: str) -> str:
    assert old in FEDERATED, old
    return FEDERATED.replace(old, new, 1)


def test_valid_federated_section_loads():
    federated = _template().federated
    assert [s.name for s in federated.sites] == ["north", "south", "east"]
    assert federated.sites[1].query == "SELECT * FROM reach_demos"
    assert (federated.rounds, federated.strategy, federated.min_sites,
            federated.local_epochs) == (3, "fedavg", 2, 2)
    assert _template("").federated is None  # the section is optional


def test_fedprox_with_mu_loads():
    text = _edit("strategy: fedavg", "strategy: fedprox\n  proximal_mu: 0.01")
    assert _template(text).federated.proximal_mu == 0.01


def test_fedavgm_with_momentum_loads():
    text = _edit("strategy: fedavg", "strategy: fedavgm\n  server_momentum: 0.7")
    federated = _template(text).federated
    assert (federated.strategy, federated.server_momentum, federated.server_lr) == (
        "fedavgm", 0.7, None)
    text = _edit("strategy: fedavg", "strategy: fedavgm\n  server_momentum: 0\n  server_lr: 1.5")
    assert _template(text).federated.server_lr == 1.5
    text = _edit("strategy: fedavg", "strategy: fedavgm\n  server_momentum: 0.7\n"
                 "  proximal_mu: 0.01")  # FedProx's local term under server momentum
    assert _template(text).federated.proximal_mu == 0.01


def test_robust_strategies_load():
    text = _edit("strategy: fedavg", "strategy: fedmedian").replace("min_sites: 2", "min_sites: 3")
    assert _template(text).federated.strategy == "fedmedian"
    text = _edit("strategy: fedavg", "strategy: fedtrimmedavg\n  trim_beta: 0.34").replace(
        "min_sites: 2", "min_sites: 3")
    assert _template(text).federated.trim_beta == 0.34


def test_shipped_federated_template_uses_server_momentum():
    """The shipped example's choice (bench/federated.py, README): FedAvgM with FedProx's term,
    30 x 1 epochs."""
    text = (REPO / "config_templates" / "reach_bc_federated.yaml").read_text()
    federated = parse_template(text, "reach_bc_federated.yaml").federated
    assert (federated.strategy, federated.rounds, federated.local_epochs) == ("fedavgm", 30, 1)
    assert (federated.server_momentum, federated.proximal_mu) == (0.7, 0.01)


MALFORMED = [
    pytest.param(_edit("  rounds: 3", "  rounds: 3\n  round: 4"),
                 ["federated.round", "unknown key 'round'"], id="unknown-key"),
    pytest.param(_edit("{name: east, hub: \"file:///data/east/datahub\"}",
                       "{name: east, hub: /e, port: 1}"),
                 ["federated.sites.2.port", "unknown key 'port'"], id="unknown-site-key"),
    pytest.param(_edit("    - {name: south, hub: /data/south/datahub, query: \"SELECT * FROM "
                       "reach_demos\"}\n    - {name: east, hub: \"file:///data/east/datahub\"}\n",
                       ""),
                 ["federated.sites", "at least 2"], id="one-site"),
    pytest.param(_edit("name: east,", "name: north,"),
                 ["federated", "['north']", "more than once"], id="duplicate-names"),
    pytest.param(_edit("hub: /data/south/datahub", "hub: sites/north/datahub/"),
                 ["federated", "sites/north/datahub", "more than one site"], id="shared-hub"),
    pytest.param(_edit("name: east,", "name: East Site,"),
                 ["federated.sites.2.name", "should match pattern"], id="bad-site-name"),
    pytest.param(_edit("rounds: 3", "rounds: 0"),
                 ["federated.rounds", "greater than or equal to 1"], id="zero-rounds"),
    pytest.param(_edit("min_sites: 2", "min_sites: 4"),
                 ["federated.min_sites is 4", "only 3 site(s)"], id="min-sites-above-sites"),
    pytest.param(_edit("fraction_fit: 1.0", "fraction_fit: 0.5"),
                 ["fraction_fit 0.5 samples 1 of 3", "min_sites (2)"], id="fraction-too-small"),
    pytest.param(_edit("fraction_fit: 1.0", "fraction_fit: 1.5"),
                 ["federated.fraction_fit", "less than or equal to 1"], id="fraction-above-1"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedprox"),
                 ["proximal_mu is required", "fedprox"], id="fedprox-without-mu"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedavg\n  proximal_mu: 0.1"),
                 ["proximal_mu (0.1)", "'fedprox' and 'fedavgm' only"], id="mu-with-fedavg"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedsgd"),
                 ["federated.strategy", "'fedavg'", "'fedprox'", "'fedavgm'"],
                 id="unknown-strategy"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedavgm"),
                 ["server_momentum is required", "fedavgm"], id="fedavgm-without-momentum"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedavg\n  server_momentum: 0.9"),
                 ["server_momentum (0.9)", "'fedavgm' only"], id="momentum-with-fedavg"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedprox\n  proximal_mu: 0.1\n"
                       "  server_lr: 2"),
                 ["server_lr (2.0)", "'fedavgm' only"], id="server-lr-with-fedprox"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedavgm\n  server_momentum: 1.0"),
                 ["federated.server_momentum", "less than 1"], id="momentum-1"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedavgm\n  server_momentum: -0.1"),
                 ["federated.server_momentum", "greater than or equal to 0"],
                 id="momentum-negative"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedavgm\n  server_momentum: 0.5\n"
                       "  server_lr: 0"),
                 ["federated.server_lr", "greater than 0"], id="server-lr-zero"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedmedian"),
                 ["'fedmedian' with min_sites 2", "median of two sites is their mean",
                  "min_sites: 3"], id="median-of-two"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedtrimmedavg"),
                 ["trim_beta is required", "fedtrimmedavg"], id="trimmed-without-beta"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedtrimmedavg\n  trim_beta: 0.2"),
                 ["trim_beta 0.2 cuts int(0.2 x 2) = 0 sites", "raise min_sites to 5"],
                 id="trimmed-cuts-none"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedtrimmedavg\n  trim_beta: 0.3").replace(
                     "min_sites: 2", "min_sites: 3"),
                 ["cuts int(0.3 x 3) = 0", "raise min_sites to 4", "or trim_beta to 0.333"],
                 id="trimmed-cuts-none-of-3"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedtrimmedavg\n  trim_beta: 0.5"),
                 ["federated.trim_beta", "less than 0.5"], id="trim-half"),
    pytest.param(_edit("strategy: fedavg", "strategy: fedavg\n  trim_beta: 0.2"),
                 ["trim_beta (0.2)", "'fedtrimmedavg' only"], id="beta-with-fedavg"),
    pytest.param(_edit("query: \"SELECT * FROM reach_demos\"", "query: \"DELETE FROM x\""),
                 ["federated.sites.1.query", "single SELECT"], id="site-query-not-select"),
    pytest.param(_edit("local_epochs: 2", "local_epochs: 0"),
                 ["federated.local_epochs", "greater than or equal to 1"], id="zero-epochs"),
]


@pytest.mark.parametrize(("section", "fragments"), MALFORMED)
def test_malformed_federated_section(section, fragments):
    with pytest.raises(TemplateError) as info:
        _template(section)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(("old", "new", "fragment"), [
    pytest.param("procs_per_node: 1", "procs_per_node: 2", "1 node x 1 process", id="ddp"),
    pytest.param("  recipe: bc\n", "  command: {image: x, command: [run]}\n",
                 "needs a built-in training.recipe", id="custom-command"),
    pytest.param("  features:", "  allow_query_override: true\n  features:",
                 "allow_query_override is not supported", id="query-override"),
    pytest.param("  recipe: bc\n", "  recipe: classifier\n",
                 "training.recipe 'classifier' is not supported", id="classifier"),
    pytest.param("  recipe: bc\n", "  recipe: bc\n  data_loading: stream\n",
                 "training.data_loading: stream is not supported", id="stream"),
    pytest.param("  recipe: bc\n", "  recipe: bc\n  precision: bf16\n",
                 "training.precision: bf16 is not supported", id="bf16"),
    pytest.param("  recipe: bc\n", "  recipe: bc\n  deterministic: false\n  compile: true\n",
                 "training.compile: true, deterministic: false is not supported",
                 id="compile-nondeterministic"),
])
def test_federated_conflicts_with_other_sections(old, new, fragment):
    base = BASE.replace(old, new, 1)
    assert base != BASE
    with pytest.raises(TemplateError) as info:
        _template(FEDERATED, base)
    assert fragment in str(info.value)


def test_a_bc_pixels_template_federates():
    """Frames + state federate like the MLP recipes (tests/unit/test_federated_shapes.py)."""
    base = (REPO / "config_templates" / "reach_pixels_bc.yaml").read_text()
    loaded = _template(FEDERATED, base)
    assert (loaded.training.recipe, len(loaded.federated.sites)) == ("bc_pixels", 3)


def test_json_schema_describes_the_section():
    schema = json_schema()
    text = str(schema)
    assert "federated" in schema["properties"]
    assert "fedprox" in text and "local_epochs" in text
    assert "fedavgm" in text and "server_momentum" in text
