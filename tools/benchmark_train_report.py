"""The report of tools/benchmark_train.py: the numbers derived from a run's results (`summarize`: PIT's
overhead ratios, the shares of its step, pipeline headroom, export latency) and the Markdown report of a run's
JSON (`report`). Imports no TensorFlow: `--report` prints a JSON's report on any machine.
"""

from benchmark_train_cases import TRAIN_BASES


def by_name(results):
    return {r["case"]: r for r in results if "error" not in r}


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def step_ratios(cases, key):
    """PIT's step against the references and baselines, and the shares of its step, by wall or CPU time."""
    step = {name: r[key] for name, r in cases.items() if key in r}
    pit, ref, ref_bwd = step.get("pit"), step.get("reference"), step.get("reference_bwd")
    ratios = {"pit_over_reference": ratio(pit, ref), "pit_over_reference_bwd": ratio(pit, ref_bwd),
              "pit_over_minent": ratio(pit, step.get("minent")),
              "pit_over_source_only": ratio(pit, step.get("source_only"))}
    for suffix in ("+xla", "+bf16", "+bf16+xla", "+fp16", "+fp16+xla"):
        ratios[f"pit_over_reference{suffix}"] = ratio(step.get(f"pit{suffix}"), step.get(f"reference{suffix}"))
    ratios["pit_fed_by_pipeline_over_memory"] = ratio(step.get("pit+pipeline"), pit)
    ratios["pit_fed_by_cached_pipeline_over_memory"] = ratio(step.get("pit+pipeline+cached"), pit)
    if None not in (pit, ref, ref_bwd, step.get("pit_no_lc"), step.get("pit_no_lr")):
        # T(pit) = T(ref_bwd) + heads + lse + recon; dropping L_c removes lse, dropping L_r removes recon.
        lse, recon = pit - step["pit_no_lc"], pit - step["pit_no_lr"]
        ratios["shares_of_pit_step"] = {
            "two_domain_forward": ref / pit, "target_backward": (ref_bwd - ref) / pit,
            "coarse_heads": (pit - ref_bwd - lse - recon) / pit, "lse_pooling_and_image_loss": lse / pit,
            "reconstruction": recon / pit}
    return ratios


def summarize(results):
    """Derived numbers: PIT's overhead ratios and the shares of its step (by wall time; by CPU time under
    `cpu`; from the interleaved `ablation` case under `interleaved` and `interleaved_cpu`), pipeline headroom,
    export latency."""
    cases = by_name(results)
    summary = step_ratios(cases, "step_ms")
    summary["cpu"] = step_ratios(cases, "cpu_ms")
    members = cases.get("ablation", {}).get("members")
    if members:
        summary["interleaved"] = step_ratios(members, "step_ms")
        summary["interleaved_cpu"] = step_ratios(members, "cpu_ms")
    pipeline = cases.get("pipeline", {}).get("images_per_s")
    cached = cases.get("pipeline+cached", {}).get("images_per_s")
    # What PIT consumes: its faster measurement (alone or interleaved), the harder bar for the pipeline.
    consumed = max([r["images_per_s"] for r in (cases.get("pit"), (members or {}).get("pit")) if r] or [None],
                   key=lambda v: v or 0)
    summary["pit_consumes_images_per_s"] = consumed
    summary["pipeline_over_consumption"] = ratio(pipeline, consumed)
    summary["cached_pipeline_over_consumption"] = ratio(cached, consumed)
    inference = cases.get("inference", {})
    summary["fine_over_plain_latency"] = ratio(inference.get("latency_fine_ms"), inference.get("latency_plain_ms"))
    summary["fine_and_plain_same_operations"] = inference.get("same_operations")
    return summary


def fmt(value, spec=".1f", none="-"):
    return none if value is None else format(value, spec)


def report(data):
    """The Markdown report of a run's JSON."""
    args, results, summary = data["args"], data["results"], data["summary"]
    cases = by_name(results)
    m = data["machine"]
    lines = [f"`{data['command']}`", "",
             f"{m['cpu']}, {m['nproc']} CPU threads, TensorFlow {m['tensorflow']}, Keras {m['keras']}; "
             f"load average {data['load_average_start'][0]:.2f} at the start, {data['load_average_end'][0]:.2f} at "
             f"the end; {len(data['other_training_processes'])} other training processes at the start.", "",
             f"Backbone `{args['backbone']}`, {args['size'][0]}x{args['size'][1]}, batch {args['batch_size']} per "
             f"domain; medians of {args['repeats']} steps after {args['warmup']} warm-up steps; SGD learning rate "
             f"{args.get('learning_rate', 0.05):g}.", ""]
    diverged = [r["case"] for r in results if r.get("loss_finite") is False]
    if diverged:
        lines += [f"**Warning: the loss was not finite in {', '.join(diverged)}**: those steps ran on NaN or infinite "
                  "values, and their times may not be a healthy step's (lower --learning_rate).", ""]
    lines += [
             "| case | what | policy | XLA | step (ms) | CPU (ms) | images/s | vs reference | compile (s) | "
             "peak RSS (MB) | other load (cores) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            error = r["error"] if len(r["error"]) <= 150 else r["error"][:150] + "... (the JSON has it all)"
            lines.append(f"| {r['case']} | failed: {error} | | | | | | | | | |")
            continue
        if "step_ms" not in r:
            continue
        what = TRAIN_BASES[r["base"]][3]
        extras = [x for x, on in (("joint forward", r["joint"]), ("pipeline-fed", r["pipeline"]),
                                  ("cached", r["cached"]),
                                  ("ASPP as dilated convolutions", r.get("asppconv", False))) if on]
        if r["steps_per_execution"] > 1:
            extras.append(f"steps_per_execution={r['steps_per_execution']}")
        if extras:
            what += f" ({', '.join(extras)})"
        suffix = "".join(s for s, on in (("+bf16", r["policy"] == "mixed_bfloat16"),
                                         ("+fp16", r["policy"] == "mixed_float16"), ("+xla", r["xla"]),
                                         ("+asppconv", r.get("asppconv", False))) if on)
        reference = cases.get(f"reference{suffix}", {}).get("step_ms")
        lines.append(f"| {r['case']} | {what} | {r['policy']} | {'on' if r['xla'] else 'off'} | "
                     f"{r['step_ms']:.1f} | {fmt(r.get('cpu_ms'))} | {r['images_per_s']:.1f} | "
                     f"{fmt(ratio(r['step_ms'], reference), '.2f')} | {r['compile_s']:.1f} | "
                     f"{fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(r.get('other_cpu_cores'))} |")
    if "ablation" in cases:
        lines += ["", f"Interleaved in one process (`ablation`: each round steps every member once, in a rotating "
                  f"order; medians of {args['repeats']} rounds; other load "
                  f"{fmt(cases['ablation'].get('other_cpu_cores'))} cores):", "",
                  "| member | step (ms) | CPU (ms) | vs reference (wall) | (CPU) |", "|---|---|---|---|---|"]
        members = cases["ablation"]["members"]
        for name, r in members.items():
            lines.append(f"| {name} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | "
                         f"{fmt(ratio(r['step_ms'], members['reference']['step_ms']), '.2f')} | "
                         f"{fmt(ratio(r['cpu_ms'], members['reference']['cpu_ms']), '.2f')} |")
    if "self_training" in cases and "members" in cases["self_training"]:
        members = cases["self_training"]["members"]
        goals = {"source_only_st": "<= 1.5", "pit_st": "<= 2"}
        lines += ["", f"Self-training against the PIT step, interleaved in one process (`self_training`; medians of "
                  f"{args['repeats']} rounds; other load {fmt(cases['self_training'].get('other_cpu_cores'))} "
                  "cores):", "", "| member | step (ms) | CPU (ms) | vs PIT (wall) | (CPU) | goal |",
                  "|---|---|---|---|---|---|"]
        for name, r in members.items():
            lines.append(f"| {name} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | "
                         f"{fmt(ratio(r['step_ms'], members['pit']['step_ms']), '.2f')} | "
                         f"{fmt(ratio(r['cpu_ms'], members['pit']['cpu_ms']), '.2f')} | {goals.get(name, '')} |")
    columns = [(label, summary.get(key, {}).get("shares_of_pit_step") if key else summary.get("shares_of_pit_step"))
               for label, key in (("separate processes, wall", None), ("separate, CPU", "cpu"),
                                  ("interleaved, wall", "interleaved"), ("interleaved, CPU", "interleaved_cpu"))]
    columns = [(label, shares) for label, shares in columns if shares]
    if columns:
        lines += ["", "Where a PIT step goes (float32, XLA off), by ablation: reference; reference_bwd - reference; "
                  "pit - pit_no_lc (L_c); pit - pit_no_lr (L_r); the rest of pit - reference_bwd (coarse heads):", "",
                  "| part | " + " | ".join(label for label, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        labels = {"two_domain_forward": "two-domain forward + source backward (reference)",
                  "target_backward": "backward through the target",
                  "coarse_heads": "K coarse heads, forward + backward",
                  "lse_pooling_and_image_loss": "LSE pooling and image-level loss (L_c)",
                  "reconstruction": "reconstruction (L_r)"}
        for key, label in labels.items():
            lines.append(f"| {label} | " + " | ".join(f"{100 * shares[key]:.1f} %" for _, shares in columns) + " |")
    pipe = [cases[n] for n in ("pipeline", "pipeline+cached") if n in cases]
    if pipe:
        lines += ["", "| input pipeline | images/s (source + target) | first batch (s) | peak RSS (MB) | "
                  "vs what PIT consumes | other load (cores) |", "|---|---|---|---|---|---|"]
        for r in pipe:
            lines.append(f"| {r['case']} | {r['images_per_s']:.1f} | {r['first_batch_s']:.2f} | "
                         f"{fmt(r.get('peak_rss_mb'), '.0f')} | "
                         f"{fmt(ratio(r['images_per_s'], summary['pit_consumes_images_per_s']), '.1f')}x | "
                         f"{fmt(r.get('other_cpu_cores'))} |")
    if "inference" in cases:
        r = cases["inference"]
        lines += ["", f"| inference, 1 image at {args['size'][0]}x{args['size'][1]} (other load "
                  f"{fmt(r.get('other_cpu_cores'))} cores) | latency (ms, median) | (min) | graph operations |",
                  "|---|---|---|---|",
                  f"| exported fine branch of a PIT network | {r['latency_fine_ms']:.2f} | "
                  f"{r['latency_fine_ms_min']:.2f} | {r['operations_fine']} |",
                  f"| plain segmenter (num_units=0) | {r['latency_plain_ms']:.2f} | {r['latency_plain_ms_min']:.2f} | "
                  f"{r['operations_plain']} |", "",
                  f"The two graphs hold {'the same' if r['same_operations'] else 'different'} operations."]
    views = [summary, summary["cpu"], summary.get("interleaved", {}), summary.get("interleaved_cpu", {})]
    goals = [("PIT step / two-domain forward reference", "pit_over_reference", "<= 1.15"),
             ("PIT step / reference with target backward", "pit_over_reference_bwd", "-"),
             ("PIT step / MinEnt step", "pit_over_minent", "-"),
             ("PIT fed by the pipeline / fed from memory (step time)", "pit_fed_by_pipeline_over_memory", "-"),
             ("PIT fed by the cached pipeline / fed from memory", "pit_fed_by_cached_pipeline_over_memory", "-")]
    lines += ["", "| ratio | separate processes, wall | separate, CPU | interleaved, wall | interleaved, CPU | goal |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(fmt(view.get(key), ".2f") for view in views) + f" | {goal} |"
              for label, key, goal in goals]
    lines += [f"| {label} | {fmt(summary.get(key), '.2f')} | | | | {goal} |" for label, key, goal in (
        ("input pipeline / what PIT consumes", "pipeline_over_consumption", ">= 3"),
        ("cached input pipeline / what PIT consumes", "cached_pipeline_over_consumption", ">= 3"),
        ("exported fine branch / plain segmenter (latency)", "fine_over_plain_latency", "1.00"))]
    return "\n".join(lines)
