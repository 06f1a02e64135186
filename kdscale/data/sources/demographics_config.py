"""The ``demographics`` subsection of a source config: :class:`Demographics`, validated at load.
The reader it configures is ``kdscale.data.sources.demographics``."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Demographics:
    sex_column: str = ""                  # "" = a meta column literally named 'sex', if any
    sex_values: dict[str, str] = field(default_factory=dict)   # raw -> canonical ({} = F/M spellings)
    age_column: str = ""                  # "" = a meta column literally named 'age', if any
    age_range: list[float] = field(default_factory=lambda: [0.0, 120.0])  # plausible ages in years
    ethnicity_column: str = ""            # "" = a meta column literally named 'ethnicity', if any
    ethnicity_values: dict[str, str] = field(default_factory=dict)  # raw -> canonical ({} = as written)

    def __post_init__(self) -> None:
        if len(self.age_range) != 2 or not self.age_range[0] < self.age_range[1]:
            raise ValueError(f"age_range must be [low, high] with low < high, got {self.age_range}")
        for key in ("sex_values", "ethnicity_values"):
            bad = [v for v in getattr(self, key).values() if not str(v).strip()]
            if bad:
                raise ValueError(f"{key}: canonical values must be non-empty")
