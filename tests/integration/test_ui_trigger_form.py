"""The Airflow 3 UI trigger form of a template, in a real browser: headless Debian `chromium`
driven by Playwright (`executable_path`; Playwright's own browser download is not reachable here).

Logs in through the simple auth manager's login page, opens the `reach_bc` trigger form, checks
that every Param is shown in its section with its default and description (enums as dropdowns,
no dataset-query field since reach_bc does not allow one, while digits_smoke offers it), changes a
value, triggers, and sees the run. Screenshots are kept under `$ARF_TEST_ARTIFACTS` (default
`.arf/test-artifacts/`). The test fails, never skips, when the browser is missing.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from arf_training.client import TrainingClient
from arf_training.params import param_schemas
from arf_training.templates import load_template

# slow: one shared Airflow stack (api-server, scheduler, ...) for the three files, ~7 min.
pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("ARF_TEST_ARTIFACTS") or REPO / ".arf" / "test-artifacts")


def chromium_path() -> str:
    path = os.environ.get("ARF_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("Debian's chromium is not installed: `apt-get install -y chromium` (as root; "
                    "`make test` does it through `make browser`), or set ARF_CHROMIUM to a "
                    "Chromium binary")
    return path


@pytest.fixture(scope="module")
def browser_page(airflow_stack):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        # --no-sandbox: the suite runs as root in CI, where Chromium's sandbox refuses to start.
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1700})
            page.set_default_timeout(60_000)
            page.goto(f"{airflow_stack.url}/")
            page.wait_for_url("**/auth/login**")
            page.fill("input[name=username]", airflow_stack.username)
            page.fill("input[name=password]", airflow_stack.password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/auth/login" not in url)
            yield page
        finally:
            browser.close()


def open_trigger_form(page, url: str, dag_id: str):
    page.goto(f"{url}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Trigger Dag - {dag_id}").wait_for()
    return dialog


def number_input(dialog, name: str):
    """Chakra's number input: its +/- buttons carry the Param name, the input's id is random."""
    input_id = dialog.locator(f"[id='number-input:element_{name}:inc']").get_attribute(
        "aria-controls")
    return dialog.locator(f"[id='{input_id}']")


def test_reach_bc_trigger_form_shows_params_and_triggers_a_run(airflow_stack, browser_page):
    page, url = browser_page, airflow_stack.url
    template = load_template(REPO / "config_templates" / "reach_bc.yaml").template
    schemas = param_schemas(template)

    dialog = open_trigger_form(page, url, "reach_bc")
    sections = {s["section"] for s in schemas.values()}
    assert sections == {"Training"}  # no Data section: reach_bc allows no query override
    assert dialog.get_by_role("button", name="Data").count() == 0
    dialog.get_by_role("button", name="Training").click()
    number_input(dialog, "epochs").wait_for()
    text = dialog.inner_text()
    for name, schema in schemas.items():
        assert name in text, f"field {name} not shown"
        assert schema["description"] in text, f"description of {name} not shown"
        if "enum" in schema:  # a dropdown (combobox) holding the default
            assert dialog.locator(f"input[name='element_{name}']").input_value() == \
                str(schema["default"])
        else:
            shown = number_input(dialog, name).input_value()
            assert float(shown) == pytest.approx(float(schema["default"])), (name, shown)
    assert "dataset_query" not in text
    page.screenshot(path=str(ARTIFACTS / "trigger_form_reach_bc.png"), full_page=True)

    client = TrainingClient(airflow_stack.client_settings())
    before = {j.run_id for j in client.list(template="reach_bc")}
    epochs = number_input(dialog, "epochs")
    epochs.fill("1")
    epochs.press("Tab")
    dialog.get_by_test_id("trigger-dag-submit").click()

    deadline = time.monotonic() + 60
    while True:
        new = [j for j in client.list(template="reach_bc") if j.run_id not in before]
        if new:
            break
        assert time.monotonic() < deadline, "no reach_bc run was created by the form"
        time.sleep(1)
    [job] = new
    assert job.conf["epochs"] == 1 and job.conf["hidden_size"] == 256
    try:
        page.goto(f"{url}/dags/reach_bc/runs/{job.run_id}")
        page.get_by_text(job.run_id).first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "triggered_run_reach_bc.png"), full_page=True)
    finally:
        # The run itself is not under test here; stop it so it does not compete for the cores.
        if client.status(job.job_id, tasks=False).state not in ("success", "failed"):
            client.cancel(job.job_id)


def test_dataset_query_field_only_where_allowed(airflow_stack, browser_page):
    dialog = open_trigger_form(browser_page, airflow_stack.url, "digits_smoke")
    dialog.get_by_role("button", name="Data").click()
    dialog.get_by_text("SQL SELECT over the data hub that replaces the template's query.").wait_for()
    assert "dataset_query" in dialog.inner_text()
    browser_page.screenshot(path=str(ARTIFACTS / "trigger_form_digits_smoke_data.png"),
                            full_page=True)
