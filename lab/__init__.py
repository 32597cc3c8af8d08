"""deepfleet lab: local systemd-nspawn test hosts for the Ansible playbooks (`python -m lab --help`)."""
