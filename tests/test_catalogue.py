"""The catalogue is validated at start-up; a bad one is refused with the line and key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.infra import catalogue
from service.infra.catalogue import CatalogueError

ROOT = Path(__file__).parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "credits.toml"
    path.write_text(text)
    return path


def test_the_shipped_sample_catalogue_is_valid() -> None:
    cat = catalogue.load(ROOT / "credits.toml")
    assert cat.plan_for_price("price_starter_monthly") == ("starter", cat.plans["starter"])
    assert cat.pack_for_price("price_boost_1000") == ("boost", cat.packs["boost"])
    assert cat.referrals.referrer_credits == 3000


def test_the_shipped_sample_catalogue_prices_a_gift_by_formula() -> None:
    actions = catalogue.load(ROOT / "credits.toml").actions
    assert actions["gift"] == catalogue.ActionPrice(base=8, add="denomination")
    assert actions["postcard_us"] == 1  # flat prices sit beside it


FLAT = "[actions]\npostcard = 1\n\n"


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('[actions.gift]\nbase = -1\nadd = "denomination"\n', r":5: actions\.gift\.base: .*greater than or equal to 0"),
        ('[actions.gift]\nbase = "8"\nadd = "denomination"\n', r":5: actions\.gift\.base: .*valid integer"),
        ("[actions.gift]\nbase = 8\n", r":4: actions\.gift\.add: Field required"),
        ('[actions.gift]\nbase = 8\nadd = "denomination"\nmax = 9\n', r":7: actions\.gift\.max: Extra inputs"),
        ('[actions.gift]\nbase = 8\nadd = "Denomination value"\n', r":6: actions\.gift\.add: .*match pattern"),
        (
            '[actions.gift]\nbase = 8\nadd = "quantity"\n',
            r":6: actions\.gift\.add: .*'quantity' is taken by every spend",
        ),
    ],
)
def test_a_bad_formula_names_its_line_and_key(tmp_path: Path, table: str, error: str) -> None:
    with pytest.raises(CatalogueError, match=r"credits.toml" + error):
        catalogue.load(write(tmp_path, FLAT + table))


def test_a_bad_flat_price_still_names_its_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[actions]\npostcard = 1\nnote = 0\n\n[actions.gift]\nbase = 8\nadd = "denomination"\n')
    with pytest.raises(CatalogueError, match=r"credits.toml:3: actions\.note: Input should be greater than 0"):
        catalogue.load(path)


def test_a_legacy_plan_id_finds_its_plan() -> None:
    cat = catalogue.load(ROOT / "credits.toml")
    found = cat.plan_for_price("plan_starter")
    assert found is not None
    assert found[0] == "starter"


def test_an_unknown_price_finds_nothing() -> None:
    assert catalogue.load(ROOT / "credits.toml").plan_for_price("price_nope") is None


def test_negative_credits_name_the_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.a]\nprices = ["p"]\ncredits = -5\n')
    with pytest.raises(CatalogueError, match=r"credits.toml:3: plans\.a\.credits: .*greater than or equal to 0"):
        catalogue.load(path)


def test_an_unknown_key_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.a]\nprices = ["p"]\ncredits = 1\ncolour = "red"\n')
    with pytest.raises(CatalogueError, match=r"credits.toml:4: plans\.a\.colour: Extra inputs"):
        catalogue.load(path)


def test_an_unknown_table_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[free]\ncredits = 1\n\n[bogus]\nx = 1\n")
    with pytest.raises(CatalogueError, match=r"credits.toml:4: bogus: Extra inputs"):
        catalogue.load(path)


def test_a_price_in_two_plans_names_both_and_the_second_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[plans.a]\nprices = ["p"]\ncredits = 1\n\n[plans.b]\nprices = ["p"]\ncredits = 2\n')
    with pytest.raises(CatalogueError, match=r"credits.toml:6: .*price 'p' is in both plans\.a and plans\.b"):
        catalogue.load(path)


def test_a_bad_rollover_policy_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[free]\ncredits = 1\nrollover = "sometimes"\n')
    with pytest.raises(CatalogueError, match=r"credits.toml:3: free\.rollover"):
        catalogue.load(path)


def test_a_referral_rollover_choice_other_than_policy_or_never_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[referrals]\nreferrer_credits = 1\nrollover = "cap"\n')
    with pytest.raises(
        CatalogueError, match=r"credits.toml:3: referrals\.rollover: Input should be 'policy' or 'never'"
    ):
        catalogue.load(path)


def test_invalid_toml_is_refused_with_its_position(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match=r"not valid TOML: .*line 2"):
        catalogue.load(write(tmp_path, "[free]\ncredits = \n"))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="cannot read the catalogue"):
        catalogue.load(tmp_path / "absent.toml")


def test_the_rollover_policy_gives_the_carry_limit() -> None:
    assert catalogue.Plan(prices=["p"], credits=2000, rollover="cap", rollover_cap=2.0).carry_limit() == 4000
    assert catalogue.Plan(prices=["p"], credits=2000, rollover="none").carry_limit() == 2000
    assert catalogue.Plan(prices=["p"], credits=2000, rollover="all").carry_limit() is None
