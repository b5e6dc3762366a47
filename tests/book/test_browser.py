"""The built book in a real browser: pages render, images load, math is typeset, the widget works, and no
request leaves localhost."""

from urllib.parse import urlparse

import pytest

# Every wait below is for an event (a selector, a condition on the page); this is only the bound on a hang, not
# a speed check, and generous because the test machine may be busy.
HANG_GUARD_MS = 120_000

# The panels of a kernel-free widget that are shown (Playwright's notion of visible: a box and not hidden).
VISIBLE_PANELS_JS = """() => Array.from(document.querySelectorAll('.widget-image'))
    .filter(i => { const r = i.getBoundingClientRect();
                   return r.width > 0 && r.height > 0 && getComputedStyle(i).visibility !== 'hidden'; })
    .map(i => (i.getAttribute('src') || '').slice(0, 80))"""


def _open(browser, url):
    page = browser.new_page()
    page.set_default_timeout(HANG_GUARD_MS)
    foreign = []
    page.on(
        "request",
        lambda r: (
            foreign.append(r.url)
            if urlparse(r.url).hostname not in ("127.0.0.1", None) and not r.url.startswith("data:")
            else None
        ),
    )
    page.goto(url, wait_until="networkidle")
    return page, foreign


def _images_loaded(page):
    return page.evaluate(
        """() => Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete && i.naturalWidth > 0])"""
    )


@pytest.mark.parametrize(
    "path",
    [
        "index.html",
        "sections/01_iris.html",
        "sections/02_small_mnist.html",
        "sections/03_mnist_cifar10.html",
        "sections/04_imagenet.html",
        "sections/05_appendix.html",
        "sections/06_estimands.html",
        "rerun.html",
        "provenance.html",
    ],
)
def test_page_renders_offline_with_all_images(browser, server, path):
    page, foreign = _open(browser, f"{server}/{path}")
    assert page.locator("main h1").count() >= 1
    broken = [src for src, ok in _images_loaded(page) if not ok]
    assert not broken, f"images that did not load: {broken}"
    assert not foreign, f"requests to other hosts: {foreign[:5]}"
    page.close()


def test_index_typesets_math_and_shows_glued_numbers(browser, server):
    page, _ = _open(browser, f"{server}/index.html")
    page.wait_for_selector("mjx-container")
    assert page.locator("mjx-container").count() >= 2
    table = page.locator("table").first.inner_text()
    assert "needs the real data set" in table  # stand-in chapters say so in the claims table
    assert "not yet run" not in table  # every claim has our number or says what it needs
    assert any(v in table for v in ("reproduced", "partly reproduced", "not reproduced"))
    page.close()


@pytest.mark.parametrize(
    "path, min_images, controls",
    [
        ("sections/01_iris.html", 6, ("depth", "weight-decay")),
        ("sections/02_small_mnist.html", 4, ("test-point", "band")),
    ],
)
def test_chapter_has_banner_figures_and_working_widget(browser, server, path, min_images, controls):
    page, foreign = _open(browser, f"{server}/{path}")
    assert "How this page was computed" in page.inner_text("main")
    assert len([1 for _, ok in _images_loaded(page) if ok]) >= min_images
    page.wait_for_selector(".widget-slider")
    page.wait_for_function(f"() => ({VISIBLE_PANELS_JS})().length === 1")  # the widget manager has rendered
    before = page.evaluate(VISIBLE_PANELS_JS)
    assert len(before) == 1, "exactly one panel is visible"

    def switched_from(panels):
        """Wait until one panel other than ``panels`` is shown (the jslink has fired), then return what is shown."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            page.wait_for_function(
                f"(old) => {{ const v = ({VISIBLE_PANELS_JS})(); return v.length === 1 && v[0] !== old[0]; }}", arg=panels
            )
        except PlaywrightTimeout:
            pass  # the panel never switched: the assertion after the call says which control failed
        return page.evaluate(VISIBLE_PANELS_JS)

    slider = page.locator(".widget-slider input, .widget-slider .noUi-handle").first
    slider.focus()
    page.keyboard.press("ArrowRight")
    after_slider = switched_from(before)
    assert len(after_slider) == 1 and after_slider != before, f"moving the {controls[0]} slider switches the panel"
    page.locator(".widget-toggle-button").nth(1).click()
    after_toggle = switched_from(after_slider)
    assert len(after_toggle) == 1 and after_toggle != after_slider, f"the {controls[1]} buttons switch the panel"
    assert not foreign, f"requests to other hosts: {foreign[:5]}"
    page.close()


@pytest.mark.parametrize(
    "path, kind, says",
    [
        ("sections/01_iris.html", "note", "real data"),
        ("sections/02_small_mnist.html", "note", "reduced (MNIST"),
        ("sections/03_mnist_cifar10.html", "warning", "not CIFAR-10 numbers"),
        ("sections/04_imagenet.html", "warning", "These are not ImageNet numbers"),
        ("sections/05_appendix.html", "warning", "not CIFAR-100 numbers"),
        ("sections/06_estimands.html", "note", "not Koh & Liang"),
    ],
)
def test_the_box_at_the_top_says_how_the_chapter_was_computed(browser, server, path, kind, says):
    page, _ = _open(browser, f"{server}/{path}")
    box = page.locator(f"main .admonition.{kind}").first
    assert box.locator(".admonition-title").inner_text() == "How this page was computed"
    assert says in box.inner_text() and ":::" not in page.inner_text("main")
    page.close()


def test_table1_is_a_rendered_table_that_names_the_stand_in(browser, server):
    page, _ = _open(browser, f"{server}/sections/03_mnist_cifar10.html")
    table = page.locator("main table.dataframe", has_text="highest loss").first
    header = table.locator("thead").inner_text()
    assert "MNIST" in header and "highest loss" in header and "median loss" in header and "no wd" in header
    assert "CIFAR-10 STAND-IN (digits)" in header  # the stand-in is named in the table, not only in the box
    rows = [r.inner_text() for r in table.locator("tbody tr").all()]
    assert any(r.startswith("small_cnn") and "(" in r for r in rows)  # Spearman (Pearson) cells
    assert any(r.startswith("resnet50") and "GPU" in r for r in rows) and "--profile paper" in page.inner_text("main")
    page.close()


def test_the_imagenet_chapter_shows_the_drift_beside_the_removal_effects(browser, server):
    page, _ = _open(browser, f"{server}/sections/04_imagenet.html")
    table = page.locator("main table", has_text="median_abs_removal_vs_control").first
    header = table.locator("thead").inner_text()
    assert "drift" in header and "drift_over_removal" in header
    assert len(table.locator("tbody tr").all()) == 2  # the two random test points
    figures = [src for src, ok in _images_loaded(page) if ok and "/_images/" in src]
    assert len(figures) >= 2  # predicted against actual, and the drift figure
    text = page.inner_text("main")
    assert "CIFAR-100 rows are not CIFAR-100 numbers" in text and "needs the real data set" in text
    page.close()


def test_the_estimands_chapter_shows_the_grid_the_chain_and_the_league_table(browser, server):
    page, _ = _open(browser, f"{server}/sections/06_estimands.html")
    grid = page.locator("main table.dataframe", has_text="cold-start LOO").first  # estimator × ground truth
    header = grid.locator("thead").inner_text()
    assert "cold-start LOO" in header and "proximal response" in header
    rows = [r.inner_text() for r in grid.locator("tbody tr").all()]
    assert any(r.startswith("exact") and "±" in r for r in rows)  # mean ± sd over seeds
    assert page.locator("main table", has_text="linearisation").count() >= 1  # Bae et al.'s decomposition
    league = page.locator("main table", has_text="kronfluence").first
    assert "dattri" in league.inner_text() and "×ours" in league.locator("thead").inner_text()
    assert len([1 for src, ok in _images_loaded(page) if ok and "/_images/" in src]) >= 4
    page.close()


def test_the_claims_tables_show_interval_data_profile_and_verdict_for_every_row(browser, server):
    from fragile.book.verdicts import Verdict

    page, _ = _open(browser, f"{server}/index.html")
    tables = page.locator("main table").all()
    claims, pbrf = tables[0], tables[1]
    for table in (claims, pbrf):
        header = table.locator("thead").inner_text()
        assert all(col in header for col in ("paper", "ours: estimate [95 % interval], n", "data", "profile", "verdict"))
        rows = [[c.inner_text() for c in r.locator("td").all()] for r in table.locator("tbody tr").all()]
        assert rows and all(len(r) == 7 for r in rows)
        for _claim, _section, paper, ours, data, profile, verdict in rows:
            assert paper and ours and profile == "default"
            assert data == "—" or data.split(" ")[0] in ("real", "reduced", "stand-in"), data
            assert any(verdict.startswith(str(v)) for v in Verdict) or verdict.startswith("not comparable"), verdict
    assert "PBRF" in pbrf.inner_text() and len(pbrf.locator("tbody tr").all()) == 7
    page.close()


def test_book_builds_with_warnings_as_errors(built_book):
    html, log = built_book
    assert (html / "index.html").is_file() and (html / "sections" / "01_iris.html").is_file()
    assert (html / "sections" / "02_small_mnist.html").is_file() and (html / "sections" / "03_mnist_cifar10.html").is_file()
    assert (html / "sections" / "04_imagenet.html").is_file() and (html / "sections" / "05_appendix.html").is_file()
    assert (html / "sections" / "06_estimands.html").is_file()
    assert "build succeeded" in log or "Finished generating HTML" in log


# Where each cell of the front page's claims table lies against the viewport and the page's content column, and
# whether its text is clipped (wider than its box).
CLAIMS_TABLE_JS = """() => {
    const table = document.querySelector('table.claims');
    if (!table) return null;
    const main = document.querySelector('main').getBoundingClientRect();
    let box = table.parentElement;  // the theme's scrolling container, if any: a table wider than it is cut off
    while (box && !['auto', 'scroll', 'hidden'].includes(getComputedStyle(box).overflowX)) box = box.parentElement;
    const right = Math.min(window.innerWidth, main.right, box ? box.getBoundingClientRect().right : Infinity);
    const cells = Array.from(table.querySelectorAll('td, th')).filter(c => getComputedStyle(c).display !== 'none');
    return {
        viewport: window.innerWidth,
        page: document.documentElement.scrollWidth,
        main_right: main.right,
        rows: table.querySelectorAll('tbody tr').length,
        scrolls: box ? box.scrollWidth > box.clientWidth + 1 : false,
        outside: cells.filter(c => c.getBoundingClientRect().right > right + 1)
                      .map(c => c.innerText.slice(0, 40)),
        clipped: cells.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.innerText.slice(0, 40)),
        verdicts: Array.from(table.querySelectorAll('tbody tr td:last-child')).map(c => c.innerText.trim()),
    };
}"""


@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)], ids=["1280px", "phone"])
def test_the_claims_table_is_readable_whole_at_1280px_and_on_a_phone(browser, server, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(HANG_GUARD_MS)
    page.goto(f"{server}/index.html", wait_until="networkidle")
    got = page.evaluate(CLAIMS_TABLE_JS)
    page.close()
    assert got is not None, "the front page has no table.claims"
    assert got["rows"] >= 20
    assert got["page"] <= got["viewport"], f"the page scrolls sideways: {got['page']} px wide in {got['viewport']}"
    assert not got["scrolls"], "the table is wider than its container: its last columns are hidden behind a scroll bar"
    assert not got["outside"], f"cells beyond the content column: {got['outside'][:5]}"
    assert not got["clipped"], f"cells whose text is cut: {got['clipped'][:5]}"
    assert all(got["verdicts"]), "a row shows no verdict"
