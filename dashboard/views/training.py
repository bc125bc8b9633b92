"""Fine-tuning: jobs with status, hyperparameters and data hashes; loss curves; models."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, session, training
from dashboard.session import plain

session.require_principal()
stores = session.stores()

st.title("Fine-tuning")

jobs = training.jobs_table(stores.jobs)
if jobs.empty:
    st.info(
        "No fine-tuning jobs yet. Train the offline demo adapter (about a minute on two "
        "cores) with `safegate finetune demo` (`make run` does it once), or your own with "
        'the demo\'s settings (README, "Fine-tune Phi-3"): `safegate finetune train --base '
        "demo-base --train data/finetune/houseplants.jsonl --name plants-v1 --epochs 10 "
        "--learning-rate 5e-3 --modules-to-save lm_head --also-without-system`."
    )
else:
    counts = jobs["status"].value_counts()
    columns = st.columns(5)
    for column, status in zip(
        columns, ("queued", "running", "succeeded", "failed", "cancelled"), strict=True
    ):
        column.metric(status, int(counts.get(status, 0)))
    st.dataframe(
        jobs,
        hide_index=True,
        width="stretch",
        column_config={
            "train_sha256": st.column_config.TextColumn("train data sha256"),
            "validation_sha256": st.column_config.TextColumn("validation data sha256"),
            "duration_s": st.column_config.NumberColumn("duration (s)"),
        },
    )

    job_ids = list(jobs["id"])
    trained = [i for i, status in enumerate(jobs["status"]) if status in ("running", "succeeded")]
    job_id = st.selectbox(
        "Job",
        job_ids,
        index=trained[0] if trained else 0,
        format_func=lambda value: f"{value} · {jobs.set_index('id').loc[value, 'model']}",
        key="job",
    )
    job = stores.jobs.get(job_id)
    st.markdown(
        f"**{plain(job.model_name)}** on {plain(job.base)}: **{job.status.value}**"
        + (f" · error: {plain(job.error)}" if job.error else "")
    )
    left, right = st.columns([3, 2])
    with right:
        st.markdown("**Hyperparameters**")
        st.dataframe(training.hyperparameter_table(job), hide_index=True, width="stretch")
        st.markdown("**Data sha256**")
        st.json(job.data_sha256)
    with left:
        path = training.results_path(job, jobs_dir=stores.jobs_dir, registry=stores.models)
        if path is None:
            st.info(
                "This job has no results.csv yet: it is written at the first logging step "
                f"(under `{stores.jobs_dir / job.id}`)."
            )
        else:
            results = training.read_results(path)
            per_step, per_epoch = st.tabs(["per step", "per epoch"])
            with per_step:
                steps = training.loss_per_step(results)
                st.altair_chart(charts.loss_curves(steps, x="step"), width="stretch")
            with per_epoch:
                epochs = training.loss_per_epoch(results)
                st.altair_chart(charts.loss_curves(epochs, x="epoch"), width="stretch")
                st.dataframe(
                    epochs.pivot_table(index="epoch", columns="series", values="loss"),
                    width="stretch",
                )
            st.caption(f"from {plain(path)}")

st.subheader("Deployed models")
deployed = training.models_table(stores.models, deployed_only=True)
if deployed.empty:
    st.info(
        "No model is deployed. `safegate models deploy NAME` deploys a trained adapter; "
        "the gateway serves it by name."
    )
else:
    st.dataframe(deployed, hide_index=True, width="stretch")
with st.expander("All registered models"):
    st.dataframe(training.models_table(stores.models), hide_index=True, width="stretch")
