"""Device classes: the ``zimage.io/device-class`` node label of a K3s site and the planner profile each
class runs, and which class a detected device belongs to.

Torch-free. One table, ``DEVICE_CLASSES``: the K3s bundle has one component per class
(k3s/components/<class>), whose pods select on the label and plan for the class's profile; tests/k3s
checks that the components say what this table says.

A device belongs to the class whose profile it covers: the same kind (a Jetson never gets a CUDA
class, whose image is for x86-64), a compute capability at least the profile's and at least the
profile's memory. Among those, the class with the most memory, then the newest capability: the pods
of that class are sized and planned for a device no larger than this one, so they fit. The match is
``exact`` when the device is the profile's own (same capability, memory within the tolerance); an
A100 or an AGX Orin 64 GB covers a class without being its device, and the label tool says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantize.profiles import PROFILES, DeviceProfile
from zimage_edge.device import GIB, DeviceFacts
from zimage_edge.errors import ZimageEdgeError

# The node label the bundle's pods select on.
LABEL = "zimage.io/device-class"

# Class -> planner profile (quantize/profiles.py).
DEVICE_CLASSES: dict[str, str] = {
    "jetson-orin-nano": "jetson-orin-nano-8gb",
    "jetson-orin-nx": "jetson-orin-nx-16gb",
    "jetson-agx-orin": "jetson-agx-orin-32gb",
    "t4": "t4-16gb",
    "l4": "l4-24gb",
    "a10": "a10-24gb",
    "cpu": "cpu",
}

# How far below (or, for an exact match, above) a profile's memory a device may measure and still be
# that device. Profiles give what devices report, and measurements sit a few percent off: a T4 reports
# 14.6 GiB to CUDA against the profile's 15.0, a "32 GB" host 31.3 GiB of MemTotal against 32.0.
# Ten percent also absorbs firmware carve-outs, and stays well inside the gaps between the classes of
# one kind (their memory sizes are at least 1.5x apart), so no device lands between two classes by it.
MEMORY_TOLERANCE = 0.10


class NoDeviceClass(ZimageEdgeError):
    """The device covers no class's profile: no pod of the bundle is sized for it."""


@dataclass(frozen=True)
class ClassMatch:
    """The class a device belongs to, the profile the class plans for, and whether it is that device."""

    device_class: str
    profile: DeviceProfile
    exact: bool


def class_profile(device_class: str) -> DeviceProfile:
    """The planner profile of a device class."""
    try:
        return PROFILES[DEVICE_CLASSES[device_class]]
    except KeyError:
        raise ValueError(f"unknown device class {device_class!r}; one of: {', '.join(DEVICE_CLASSES)}") from None


def covers(facts: DeviceFacts, profile: DeviceProfile) -> bool:
    """Whether the device can run what is planned for ``profile``."""
    if facts.kind is not profile.kind:
        return False
    if profile.compute_capability is not None and (
        facts.compute_capability is None or facts.compute_capability < profile.compute_capability
    ):
        return False
    return facts.total_memory >= profile.memory_gib * GIB * (1 - MEMORY_TOLERANCE)


def is_profile_device(facts: DeviceFacts, profile: DeviceProfile) -> bool:
    """Whether the device is the one ``profile`` describes (its capability, its memory within tolerance)."""
    memory = profile.memory_gib * GIB
    return (
        facts.kind is profile.kind
        and facts.compute_capability == profile.compute_capability
        and abs(facts.total_memory - memory) <= memory * MEMORY_TOLERANCE
    )


def match_class(facts: DeviceFacts) -> ClassMatch:
    """The device class of a detected device; ``NoDeviceClass`` if it covers none."""
    fits = [(name, class_profile(name)) for name in DEVICE_CLASSES if covers(facts, class_profile(name))]
    if not fits:
        own = next((p.name for p in PROFILES.values() if is_profile_device(facts, p)), None)
        capability = ".".join(map(str, facts.compute_capability)) if facts.compute_capability else "none"
        what = f"{facts.name} ({facts.kind}, compute capability {capability}, {facts.total_memory / GIB:.1f} GiB)"
        why = f"it is planner profile {own}, which no class runs" if own else "no class's profile fits it"
        raise NoDeviceClass(f"no device class for {what}: {why}; classes: {', '.join(DEVICE_CLASSES)}")
    name, profile = max(fits, key=lambda item: (item[1].memory_gib, item[1].compute_capability or (0, 0)))
    return ClassMatch(name, profile, is_profile_device(facts, profile))
