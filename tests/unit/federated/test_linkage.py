"""The linkage key: keyed hashes of patient ids (HMAC-SHA256, checked against RFC 4231's
worked example), a key file that is never replaced and is read with clear errors, and the
coordinator's count of patients present at several sites."""

import stat

import pytest

from stagewise.federated.linkage import (LinkageKeyError, key_check, linkage_line, patient_links, read_linkage_key,
                                         shared_patients, write_linkage_key)


def test_links_are_hmac_sha256_of_the_trimmed_case_folded_id():
    # RFC 4231, test case 2: HMAC-SHA256(key "Jefe", "what do ya want for nothing?")
    expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"[:16]
    assert patient_links(b"Jefe", ["what do ya want for nothing?"]) == [expected]
    assert patient_links(b"Jefe", ["  What do ya want for NOTHING? ", "what do ya want for nothing?"]) == [expected]
    assert patient_links(b"other key", ["what do ya want for nothing?"]) != [expected]


def test_the_key_file_is_private_never_replaced_and_read_with_clear_errors(tmp_path):
    path = write_linkage_key(tmp_path / "keys" / "linkage.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(read_linkage_key(path)) == 32
    before = path.read_text()
    with pytest.raises(LinkageKeyError, match="exists: a linkage key is never replaced"):
        write_linkage_key(path)
    assert path.read_text() == before
    with pytest.raises(LinkageKeyError, match=r"linkage key .*absent.key: .*federation linkage-key -o FILE"):
        read_linkage_key(tmp_path / "absent.key")
    (tmp_path / "bad.key").write_text("not hex at all\n")
    with pytest.raises(LinkageKeyError, match="not a key made by `stagewise federation linkage-key`"):
        read_linkage_key(tmp_path / "bad.key")


def test_the_coordinator_counts_shared_patients_only_when_every_site_holds_the_same_key():
    key = b"k" * 32
    links = {"A": patient_links(key, ["p1", "p2", "p3"]), "B": patient_links(key, ["p3", "p4"]),
             "C": patient_links(key, ["p1", "p3", "p9"])}
    same = {s: key_check(key) for s in links}
    found = shared_patients(links, same)
    assert found == {"checked": True, "patients_at_several_sites": 2, "per_pair": {"A+B": 1, "A+C": 2, "B+C": 1}}
    assert linkage_line(found).startswith("2 patient(s) appear at more than one site")
    none_shared = shared_patients({"A": links["A"], "B": patient_links(key, ["p7"])}, {"A": same["A"], "B": same["B"]})
    assert "none appears at two sites" in linkage_line(none_shared)
    missing = shared_patients({"A": links["A"], "B": None}, {"A": same["A"], "B": None})
    assert missing["checked"] is False and missing["sites_without_linkage_key"] == ["B"]
    assert "counted at each" in linkage_line(missing)
    differing = shared_patients(links, same | {"C": key_check(b"x" * 32)})
    assert differing["checked"] is False and "different linkage keys" in differing["note"]
