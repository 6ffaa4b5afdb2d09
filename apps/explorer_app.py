"""The residscope explorer: `residscope app [--model M]`, or `streamlit run apps/explorer_app.py`.

The sidebar picks the model (an alias from the registry, or a local folder / .gguf path), the page and the prompt;
`?page=<name>` in the URL opens a page directly. The default model is `$RESIDSCOPE_EXPLORER_MODEL`, else the bundled
one. Errors show as one-line messages; the server log gets the traceback of unexpected errors only.
"""

from __future__ import annotations

import logging

import streamlit as st

from residscope.apps import explorer_cache as cache
from residscope.apps.errors import log_failure, one_line
from residscope.apps.explorer_pages import DEFAULT_PROMPT, PAGES

log = logging.getLogger("residscope.explorer")
LOCAL = "local folder or .gguf file..."


def pick_page() -> str:
    keys = list(PAGES)
    current = st.query_params.get("page", keys[0])
    if current not in keys:
        current = keys[0]
    choice = st.sidebar.radio("Page", keys, index=keys.index(current), format_func=lambda k: PAGES[k][0])
    if st.query_params.get("page") != choice:
        st.query_params["page"] = choice
    return choice


def pick_model() -> str | None:
    """The model source picked in the sidebar, or None (with a message) when there is nothing to load."""
    rows = {r["alias"]: r for r in cache.model_rows()}
    default = cache.default_model()
    options = [*rows, LOCAL]
    index = options.index(default) if default in rows else options.index(LOCAL)
    choice = st.sidebar.selectbox("Model", options, index=index, key="model_choice",
                                  format_func=lambda a: a if a not in rows or rows[a]["installed"] else f"{a} (not installed)")
    if choice == LOCAL:
        path = st.sidebar.text_input("Folder or .gguf path", "" if default in rows else default, key="model_path").strip()
        if not path:
            st.info("Enter a Hugging Face model folder or a .gguf file in the sidebar.")
            return None
        return path
    row = rows[choice]
    if not row["installed"]:
        st.error(f"{choice} is not installed here: {row['install']}")
        return None
    st.sidebar.caption(row["description"])
    return choice


def main() -> None:
    st.set_page_config(page_title="residscope explorer", page_icon="🔬", layout="wide")
    st.sidebar.title("residscope explorer")
    page = pick_page()
    source = pick_model()
    st.sidebar.text_area("Prompt", DEFAULT_PROMPT, key="prompt", height=100)
    if source is None:
        return
    try:
        with st.spinner(f"Loading {source}...", show_time=True):
            lm = cache.model(source)
    except Exception as e:  # noqa: BLE001 - any load failure is shown, not raised
        log_failure(log, e, f"loading {source}")
        st.error(f"Cannot load {source}: {one_line(e)}")
        return
    cfg = lm.cfg
    st.sidebar.caption(f"{cfg.model_type}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads}/{cfg.n_kv_heads} "
                       f"heads, {cfg.positional} positions, max {cfg.max_position_embeddings} tokens")
    try:
        PAGES[page][1](source)
    except Exception as e:  # noqa: BLE001 - Streamlit's own control flow (rerun, stop) is not an Exception
        log_failure(log, e, f"page {page} on {source}")
        st.error(one_line(e))


main()
