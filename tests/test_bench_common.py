"""bench/common.py: benchmark JSONs describe their machine from the same source as training reports."""


def test_machine_facts_start_from_the_report_environment(load_bench):
    common = load_bench("common")
    facts = common.machine_facts()
    env = facts["environment"]
    assert {"torch", "python", "threads", "cpu_capability", "moeclip"} <= set(env)
    assert facts["versions"]["torch"] == env["torch"] and facts["torch_threads_default"] == env["threads"]
    assert facts["cpu_model"] and facts["mem_gb"] > 0
