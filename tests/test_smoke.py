from tests.waiting import wait_until


def test_a_dropped_file_is_copied_and_verified(setup, start_agent):
    far = setup.archive()
    inbox = setup.rule()
    start_agent(setup)
    (inbox / "a.txt").write_text("hello")
    wait_until(lambda: (far / "a.txt").exists() and (far / "a.txt").read_text() == "hello")
    catalog = setup.catalog()
    wait_until(lambda: all(r.verified for r in catalog.rows_for_path(str(inbox / "a.txt"))))
