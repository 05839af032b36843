"""What a finished run shows: the HTML report (`html.write_report`) and Grad-CAM maps (`saliency`).

The report is split by job: `formatting` (numbers), `figures` (matplotlib PNGs), `units` (unit order),
`context` (reading the run into the template's context, from `run_files` and `sections`),
`checklist` (TRIPOD+AI / CLAIM items), `templates/report.html.j2` (the page, package data) and `html`
(rendering and writing it).
"""
