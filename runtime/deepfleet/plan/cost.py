"""Cloud rent against buying: months until the on-prem capital is paid back by the rent it saves.

The source documents' example: 8xA100 in the cloud about 42,000 a month against 2xH100 on-prem for 280,000 once,
"payback about 9.2 months". Capital over rent alone gives 6.7 months; 9.2 months holds once the on-prem side
also pays about 11,565 a month to run (power, hosting, operations), which the documents do not itemise. The
defaults below are that example; every figure is a flag."""

from __future__ import annotations

from dataclasses import dataclass

HOURS_PER_MONTH = 730

EXAMPLE_CLOUD_MONTHLY = 42_000.0
EXAMPLE_ONPREM_CAPEX = 280_000.0
EXAMPLE_ONPREM_MONTHLY = 11_565.0  # the running cost the documents' 9.2 months implies


@dataclass
class Payback:
    cloud_monthly: float
    onprem_capex: float
    onprem_monthly: float
    power_kw: float
    power_price_per_kwh: float
    savings_monthly: float
    months: float | None  # None: on-prem never pays back (it costs as much a month as the cloud)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def payback(cloud_monthly: float, onprem_capex: float, onprem_monthly: float, power_kw: float = 0.0,
            power_price_per_kwh: float = 0.0) -> Payback:
    for name, value in (("cloud_monthly", cloud_monthly), ("onprem_capex", onprem_capex),
                        ("onprem_monthly", onprem_monthly), ("power_kw", power_kw),
                        ("power_price_per_kwh", power_price_per_kwh)):
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    running = onprem_monthly + power_kw * HOURS_PER_MONTH * power_price_per_kwh
    savings = cloud_monthly - running
    return Payback(cloud_monthly, onprem_capex, onprem_monthly, power_kw, power_price_per_kwh, savings,
                   onprem_capex / savings if savings > 0 else None)
