"""mDNS discovery on loopback: settings parsing, announce/browse/withdraw, malformed services ignored, disabled no-ops.

Every Zeroconf here binds to 127.0.0.1 only (IPv4), every wait is bounded, and peer ids are random per test so
services left by parallel runs never collide.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from swarm.transport.errors import ConfigError
from swarm.transport.mdns import SERVICE_TYPE, MdnsAnnouncer, MdnsBrowser, MdnsPeer, MdnsSettings, open_zeroconf

LOOPBACK = MdnsSettings(enabled=True, interfaces=("127.0.0.1",))
WAIT = 8.0  # seconds; found in about one second on loopback


def new_id() -> str:
    return secrets.token_hex(8)


def by_id(peers: list[MdnsPeer], peer_id: str) -> MdnsPeer | None:
    return next((p for p in peers if p.peer_id == peer_id), None)


@pytest.fixture
def browser() -> Iterator[MdnsBrowser]:
    b = MdnsBrowser(LOOPBACK)
    try:
        yield b.start()
    finally:
        b.close()


# --- settings ---------------------------------------------------------------------------------------------------


def test_settings_default_enabled_on_all_interfaces():
    assert MdnsSettings.from_options(None, None, env={}) == MdnsSettings(enabled=True, interfaces=None)


@pytest.mark.parametrize("value, enabled", [("0", False), ("false", False), ("No", False), (" off ", False),
                                            ("1", True), ("TRUE", True), ("yes", True), ("on", True), ("", True)])
def test_settings_env_switch(value, enabled):
    assert MdnsSettings.from_options(None, None, env={"SWARM_MDNS": value}).enabled is enabled


def test_settings_explicit_options_win_over_env():
    env = {"SWARM_MDNS": "0", "SWARM_MDNS_INTERFACE": "10.0.0.1"}
    settings = MdnsSettings.from_options(True, "127.0.0.1", env=env)
    assert settings == MdnsSettings(enabled=True, interfaces=("127.0.0.1",))
    assert MdnsSettings.from_options(False, None, env={"SWARM_MDNS": "1"}).enabled is False


def test_settings_env_interface():
    settings = MdnsSettings.from_options(None, None, env={"SWARM_MDNS_INTERFACE": "192.168.1.20"})
    assert settings.interfaces == ("192.168.1.20",)


@pytest.mark.parametrize("env", [{"SWARM_MDNS": "maybe"}, {"SWARM_MDNS_INTERFACE": "eth0"},
                                 {"SWARM_MDNS_INTERFACE": "::1"}, {"SWARM_MDNS_INTERFACE": "300.1.1.1"},
                                 {"SWARM_MDNS_INTERFACE": "0.0.0.0"}])
def test_settings_bad_env_raises(env):
    with pytest.raises(ConfigError) as err:
        MdnsSettings.from_options(None, None, env=env)
    assert next(iter(env)) in str(err.value)


def test_settings_bad_explicit_interface_raises():
    with pytest.raises(ConfigError, match="IPv4"):
        MdnsSettings.from_options(None, "not-an-ip", env={})


# --- announce and browse on loopback ------------------------------------------------------------------------------


def test_announcer_is_found_with_endpoint_and_model(browser):
    peer_id = new_id()
    with MdnsAnnouncer(peer_id, 45123, "tiny/llama-test", LOOPBACK) as announcer:
        assert announcer.endpoints == ("tcp://127.0.0.1:45123",)
        assert browser.wait_for(lambda peers: by_id(peers, peer_id) is not None, WAIT)
        assert by_id(browser.peers(), peer_id) == MdnsPeer(peer_id, ("tcp://127.0.0.1:45123",), "tiny/llama-test")


def test_two_announcers_found_and_closed_one_disappears(browser):
    first, second = new_id(), new_id()
    changes: list[int] = []
    watcher = MdnsBrowser(LOOPBACK, on_change=lambda: changes.append(1))
    a = MdnsAnnouncer(first, 45001, "m", LOOPBACK, host="127.0.0.1")
    b = MdnsAnnouncer(second, 45002, "m", LOOPBACK)
    try:
        watcher.start()
        with ThreadPoolExecutor(2) as pool:  # each registration probes for ~1.5 s: both at once
            list(pool.map(MdnsAnnouncer.start, (a, b)))
        assert browser.wait_for(lambda ps: by_id(ps, first) and by_id(ps, second), WAIT)
        assert watcher.wait_for(lambda ps: by_id(ps, first) and by_id(ps, second), WAIT)
        assert len(changes) >= 2
        a.close()
        assert a.endpoints == ()
        assert browser.wait_for(lambda ps: by_id(ps, first) is None, 5.0)
        assert by_id(browser.peers(), second) is not None
    finally:
        a.close()
        b.close()
        watcher.close()


def test_shared_zeroconf_announces_and_browses():
    zc = open_zeroconf(LOOPBACK)
    assert zc is not None
    peer_id = new_id()
    try:
        with MdnsBrowser(LOOPBACK, zc=zc) as b, MdnsAnnouncer(peer_id, 45003, "m", LOOPBACK, zc=zc):
            assert b.wait_for(lambda ps: by_id(ps, peer_id) is not None, WAIT)
        assert not zc.done  # the shared instance stays open for its owner
    finally:
        zc.close()


def test_long_model_is_truncated_to_one_txt_entry(browser):
    peer_id = new_id()
    with MdnsAnnouncer(peer_id, 45004, "é" * 300, LOOPBACK):
        assert browser.wait_for(lambda ps: by_id(ps, peer_id) is not None, WAIT)
        # 249 bytes of room for the value after "model=", cut at a whole character
        assert by_id(browser.peers(), peer_id).model == "é" * 124


def test_malformed_services_are_ignored(browser, caplog):
    good = new_id()
    tag = secrets.token_hex(4)
    bad = {f"bad-hex-{tag}": {"id": "not-hex!", "proto": "1"}, f"bad-short-{tag}": {"id": "abc1", "proto": "1"},
           f"bad-noid-{tag}": {"proto": "1", "model": "m"}, f"bad-upper-{tag}": {"id": "ABCDEF0123", "proto": "1"}}
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    infos = [ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=45005, properties=props,
                         server=f"{name}.local.", parsed_addresses=["127.0.0.1"]) for name, props in bad.items()]
    try:
        with caplog.at_level(logging.DEBUG, logger="swarm.transport.mdns"):
            with ThreadPoolExecutor(len(infos)) as pool:  # each registration probes for ~1.5 s: do them at once
                list(pool.map(zc.register_service, infos, timeout=WAIT))
            with MdnsAnnouncer(good, 45006, "m", LOOPBACK):
                assert browser.wait_for(lambda ps: by_id(ps, good) is not None, WAIT)
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline and not all(n in caplog.text for n in bad):
                    time.sleep(0.05)
                assert all(f"ignoring mDNS service {n}" in caplog.text for n in bad), caplog.text
                assert [p.peer_id for p in browser.peers() if p.peer_id in (good, "not-hex!", "abc1")] == [good]
                assert not any(p.peer_id.startswith("ABCDEF") for p in browser.peers())
    finally:
        zc.close()


# --- disabled or unavailable --------------------------------------------------------------------------------------


def test_disabled_settings_are_no_ops():
    off = MdnsSettings(enabled=False, interfaces=("127.0.0.1",))
    assert open_zeroconf(off) is None
    with MdnsAnnouncer(new_id(), 45007, "m", off) as announcer, MdnsBrowser(off) as b:
        assert announcer.endpoints == ()
        assert b.peers() == []
        assert b.wait_for(lambda ps: bool(ps), 0.1) is False


def test_unusable_interface_logs_a_warning_and_does_nothing(caplog):
    # 192.0.2.1 (TEST-NET-1) is on no interface of this machine, so zeroconf cannot bind to it
    nowhere = MdnsSettings(enabled=True, interfaces=("192.0.2.1",))
    with caplog.at_level(logging.WARNING, logger="swarm.transport.mdns"):
        with MdnsAnnouncer(new_id(), 45008, "m", nowhere) as announcer, MdnsBrowser(nowhere) as b:
            assert announcer.endpoints == ()
            assert b.peers() == []
    assert "mDNS discovery is off" in caplog.text


def test_bad_port_is_refused():
    with pytest.raises(ConfigError):
        MdnsAnnouncer(new_id(), 0, "m", LOOPBACK)
