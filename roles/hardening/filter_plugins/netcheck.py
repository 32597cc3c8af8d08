"""Pure logic of the hardening role, importable by pytest: CIDR validation without ansible.utils."""

import ipaddress


def cidr_problems(networks, variable):
    """One message per entry of `networks` that is not a network in CIDR form (host bits must be zero,
    so a typo like 10.0.0.5/24 is caught rather than silently widened); [] when all are valid."""
    if not isinstance(networks, list | tuple):
        return [f"{variable} must be a list of CIDR networks, got {networks!r}"]
    problems = []
    for net in networks:
        try:
            ipaddress.ip_network(str(net), strict=True)
        except ValueError as exc:
            problems.append(f"{variable}: {net!r} is not a valid CIDR network ({exc})")
        else:
            if "/" not in str(net):
                problems.append(f"{variable}: {net!r} has no prefix length (write e.g. {net}/32)")
    return problems


def cidrs_of_family(networks, version):
    """The networks of one IP version (4 or 6), normalised, for an nftables set."""
    return [str(n) for n in (ipaddress.ip_network(str(x), strict=True) for x in networks) if n.version == int(version)]


class FilterModule:
    def filters(self):
        return {"cidr_problems": cidr_problems, "cidrs_of_family": cidrs_of_family}
