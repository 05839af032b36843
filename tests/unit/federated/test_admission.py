"""Who a coordinator's job hears: the nodes of the sites it admitted and greeted, no other;
and a site that refuses the coordinator's job says so where its operator looks."""

from types import SimpleNamespace

from typer.testing import CliRunner

from stagewise.cli import app
from stagewise.federated.rounds import AdmittedGrid


def _message(src=None, dst=None):
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=src, dst_node_id=dst))


class _Grid:
    """Nodes 1, 2 admitted; node 99 registered a key of its own and answers everything."""

    def __init__(self):
        self.sent = []

    def get_node_ids(self):
        return [1, 2, 99]

    def send_and_receive(self, messages, timeout):
        self.sent += [m.metadata.dst_node_id for m in messages]
        return [_message(src=m.metadata.dst_node_id) for m in messages] + [_message(src=99)]


def test_a_node_outside_the_jobs_list_is_never_asked_and_its_replies_are_dropped_and_recorded():
    inner = _Grid()
    grid = AdmittedGrid(inner, {1, 2})
    assert grid.get_node_ids() == [1, 2]
    replies = grid.send_and_receive([_message(dst=n) for n in (1, 2, 99)], timeout=1)
    assert inner.sent == [1, 2]  # the model never goes to node 99
    assert [m.metadata.src_node_id for m in replies] == [1, 2]
    assert grid.take_dropped() == [99] and grid.take_dropped() == []


def test_a_refused_site_is_told_in_words_on_its_screen(tmp_path, monkeypatch):
    import stagewise.federated.launch as launch
    from stagewise.federated.site_process import REFUSED_EXIT, REFUSED_LINE

    reason = "site A refuses the coordinator's job 1234: this site's recipe makes job 5678"
    work = tmp_path / "work"

    def refused_site(site_file, server, ca, key, port, log, wait, on_retry=None):
        log.write_text(f"some Flower lines\n{REFUSED_LINE}{reason}\nmore lines\n")
        return REFUSED_EXIT

    monkeypatch.setattr(launch, "prepare_site", lambda *a: work / "site.json")
    monkeypatch.setattr(launch, "run_site", refused_site)
    work.mkdir()
    for name in ("ca.pem", "A.key"):
        (tmp_path / name).write_text("x")
    result = CliRunner().invoke(app, ["federation", "site", "r.yaml", "--manifest", "m.csv", "--site", "A",
                                      "--server", "127.0.0.1:1", "--ca", str(tmp_path / "ca.pem"),
                                      "--key", str(tmp_path / "A.key"), "--workdir", str(work)])
    assert result.exit_code == 2 and reason in " ".join(result.output.split())
