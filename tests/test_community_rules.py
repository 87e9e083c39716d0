"""Community rules without Discord: role and channel rules through the real App on the tiny engine (SQLite
and PostgreSQL), the effective rule of members with 0, 1 and 2 roles, bursts against a role's quota,
rules across a restart, and fair shares by role and server weight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bot.app import App
from bot.services.community import CommunityRules, Defaults, RoleRule
from bot.services.errors import LimitReached, NotAllowed, UserError
from bot.services.fair_queue import FairQueue
from bot.services.studio import Requester, Ticket
from bot.store.models import JobKind
from engine.api import GenerationRequest, LoraChoice
from engine.settings import EngineSettings
from fluxbot.settings import LimitSettings
from tests.bot_support import RecordingEvents, make_app, until
from tests.bot_support import make_settings as app_settings
from tests.lora_support import make_lora, sha, whitelist_toml

pytestmark = pytest.mark.usefixtures("database_backend")

SERVER, OTHER_SERVER = 500, 700  # @everyone's role id is the server's id
BOOSTER, PATRON, FOREIGN = 501, 502, 701  # FOREIGN is a role of OTHER_SERVER
IMAGES, CHAT, AFTER_DARK, LOOSE = 600, 601, 602, 603  # AFTER_DARK is age-restricted; LOOSE is not
THREAD = 610  # a thread in IMAGES
OPERATOR = Requester(user_id=1, guild_id=SERVER, channel_id=IMAGES, is_admin=True)  # admin_user_ids = [1]


def member(user_id: int, *roles: int, channel: int = IMAGES, guild: int = SERVER, **kw: object) -> Requester:
    return Requester(
        user_id=user_id, user_name=f"u{user_id}", guild_id=guild, channel_id=channel, role_ids=roles, **kw
    )  # type: ignore[arg-type]


LIMITS = LimitSettings(jobs_per_window=100, window_s=600, max_queued_per_user=50, max_queue=500)


@pytest.fixture
async def app(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> AsyncIterator[App]:
    built = await make_app(app_settings(tmp_path, make_settings, limits=LIMITS), RecordingEvents(), data_dir)
    await built.start()
    yield built
    await built.close()


async def server_rules(app: App) -> None:
    """A server like the issue's: beginners get schnell and 2 jobs, boosters dev and 10 with twice the
    share, patrons upscales and a longer queue; drawing in #images (and its threads) and #after-dark."""
    community = app.admin.community
    await community.set_role(OPERATOR, SERVER, "jobs_per_window", "2")
    await community.set_role(OPERATOR, SERVER, "presets", "schnell")
    await community.set_role(OPERATOR, SERVER, "kinds", "imagine, reroll, rerun, vary")
    await community.set_role(OPERATOR, BOOSTER, "jobs_per_window", "10")
    await community.set_role(OPERATOR, BOOSTER, "presets", "dev, cfg")
    await community.set_role(OPERATOR, BOOSTER, "weight", "2")
    await community.set_role(OPERATOR, PATRON, "max_queued", "8")
    await community.set_role(OPERATOR, PATRON, "kinds", "upscale")
    await community.set_drawing(OPERATOR, IMAGES, True)
    await community.set_drawing(OPERATOR, AFTER_DARK, True)
    await community.set_channel(OPERATOR, AFTER_DARK, "default_preset", "cfg")
    await community.set_channel(OPERATOR, IMAGES, "presets", "schnell, dev")
    await app.admin.set_preset(OPERATOR, "cfg", "nsfw", "true")


async def refusal(app: App, who: Requester, preset: str | None = None) -> str | None:
    """None when admitted; else the refusal's text."""
    try:
        await app.studio.imagine(who, GenerationRequest(prompt="a fox", preset=preset))
    except UserError as exc:
        return str(exc)
    return None


def test_a_member_gets_the_most_generous_value_of_each_field_across_their_roles() -> None:
    rules = CommunityRules()
    for role, rule in (
        (SERVER, RoleRule(jobs_per_window=2, presets=("schnell",), kinds=("imagine",))),
        (BOOSTER, RoleRule(jobs_per_window=10, presets=("dev",), weight=2.0)),
        (PATRON, RoleRule(jobs_per_window=4, max_queued=8, kinds=("upscale",))),
    ):
        rules = rules.with_role(SERVER, role, rule)
    rules = rules.with_role(OTHER_SERVER, FOREIGN, RoleRule(jobs_per_window=99))
    defaults = Defaults(jobs_per_window=5, max_queued=3)

    plain = rules.member(SERVER, [SERVER], defaults)
    boosted = rules.member(SERVER, [BOOSTER, FOREIGN], defaults)
    both = rules.member(SERVER, [BOOSTER, PATRON], defaults)
    elsewhere = rules.member(OTHER_SERVER, [BOOSTER], defaults)

    assert (plain.jobs_per_window, plain.max_queued, plain.weight) == (2, 3, 1.0)
    assert plain.presets == {"schnell"} and not plain.allows_kind(JobKind.UPSCALE)
    assert plain.sources["jobs_per_window"].role_id == SERVER and plain.sources["max_queued"].role_id is None
    assert (boosted.jobs_per_window, boosted.weight, boosted.presets) == (10, 2.0, {"schnell", "dev"})
    assert (both.jobs_per_window, both.max_queued) == (10, 8) and both.allows_kind(JobKind.UPSCALE)
    assert both.sources["jobs_per_window"].role_id == BOOSTER and both.sources["max_queued"].role_id == PATRON
    assert (elsewhere.jobs_per_window, elsewhere.presets) == (5, None), "roles of one server stay there"
    assert rules.member(None, [BOOSTER], defaults).jobs_per_window == 5, "a DM: the global defaults"


async def test_presets_kinds_and_channels_exactly_as_the_rules_say(app: App) -> None:
    await app.admin.pause(OPERATOR, True)  # admitted jobs wait: this is about admission
    await server_rules(app)

    # no role: schnell only, in the drawing channels (a thread of one too)
    assert await refusal(app, member(10), "schnell") is None
    assert "preset 'dev'" in (await refusal(app, member(10), "dev") or "")
    assert await refusal(app, member(11, channel=THREAD, parent_channel_id=IMAGES), "schnell") is None
    assert "<#600>, <#602>" in (await refusal(app, member(12, channel=CHAT), "schnell") or "")
    # a booster: dev too; the channel's list still rules (cfg is not used in #images)
    assert await refusal(app, member(20, BOOSTER), "dev") is None
    assert "not used in this channel" in (await refusal(app, member(21, BOOSTER), "cfg") or "")
    # #after-dark: its default preset is cfg, nsfw, allowed there for a booster only
    ticket = await app.studio.imagine(
        member(22, BOOSTER, channel=AFTER_DARK, age_restricted=True), GenerationRequest(prompt="x")
    )
    assert (await app.jobs.get(ticket.job_id)).spec.preset == "cfg"  # type: ignore[union-attr]
    assert "preset 'cfg'" in (await refusal(app, member(13, channel=AFTER_DARK, age_restricted=True)) or "")
    # the content policy stays on top: a channel rule naming an nsfw preset does not make it safe-for-work
    await app.admin.community.set_drawing(OPERATOR, LOOSE, True)
    await app.admin.community.set_channel(OPERATOR, LOOSE, "presets", "cfg")
    assert "age-restricted" in (await refusal(app, member(23, BOOSTER, channel=LOOSE), "cfg") or "")
    # kinds: upscales only with the patron role (refused before anything is read)
    with pytest.raises(NotAllowed, match="`upscale`"):
        await app.studio.upscale(member(30), ticket.job_id)
    with pytest.raises(UserError, match="no picture to draw from"):  # allowed; the job has not run yet
        await app.studio.upscale(member(22, PATRON, channel=AFTER_DARK, age_restricted=True), ticket.job_id)
    # another server has no rules: everything, anywhere
    assert await refusal(app, member(40, FOREIGN, guild=OTHER_SERVER, channel=999), "dev") is None


async def test_twenty_requests_at_once_from_a_member_with_two_roles_take_the_more_generous_quota(
    app: App,
) -> None:
    await app.admin.pause(OPERATOR, True)
    await app.admin.community.set_role(OPERATOR, SERVER, "jobs_per_window", "2")
    await app.admin.community.set_role(OPERATOR, BOOSTER, "jobs_per_window", "5")
    await app.admin.community.set_role(OPERATOR, PATRON, "jobs_per_window", "7")
    who = member(50, BOOSTER, PATRON)

    results = await asyncio.gather(
        *(app.studio.imagine(who, GenerationRequest(prompt=f"burst {i}")) for i in range(20)),
        return_exceptions=True,
    )

    admitted = [r for r in results if isinstance(r, Ticket)]
    assert len(admitted) == 7 and len(await app.jobs.unfinished()) == 7
    assert all(
        isinstance(r, LimitReached) and "at most 7 jobs" in str(r) for r in results if r not in admitted
    )


async def test_rules_survive_a_restart_and_are_audited(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    settings = app_settings(tmp_path, make_settings, limits=LIMITS)
    first = await make_app(settings, RecordingEvents(), data_dir)
    try:
        await server_rules(first)
        before = first.studio.member_rule(member(60, BOOSTER, PATRON))
    finally:
        await first.close()
    second = await make_app(settings, RecordingEvents(), data_dir)
    try:
        after = second.studio.member_rule(member(60, BOOSTER, PATRON))
        channels = second.studio.community.channels(SERVER)
        audit = [entry.action for entry in await second.admin.store.audit(50)]
    finally:
        await second.close()

    assert after == before and after.jobs_per_window == 10 and after.weight == 2.0
    assert channels.drawing == (IMAGES, AFTER_DARK) and channels.rule(AFTER_DARK).default_preset == "cfg"
    assert {"role.set", "channel.draw", "channel.set"} <= set(audit)


async def test_a_weight_2_role_gets_twice_the_gpu_time_of_a_weight_1_member_over_a_backlog(app: App) -> None:
    await app.admin.community.set_role(OPERATOR, BOOSTER, "weight", "2")
    await app.admin.pause(OPERATOR, True)
    booster, plain = member(70, BOOSTER), member(71)
    for i in range(12):  # both have a backlog before anything runs; the booster's jobs are twice as long
        for who, steps in ((booster, 4), (plain, 2)):
            request = GenerationRequest(prompt=f"backlog {i}", preset="schnell", steps=steps)
            await app.studio.imagine(who, request)
    events = app.studio.queue.events
    assert isinstance(events, RecordingEvents)

    await app.admin.pause(OPERATOR, False)
    await until(lambda: len(events.finished_jobs) >= 12, timeout=120)
    await app.admin.pause(OPERATOR, True)

    first = events.finished_jobs[:12]
    # GPU time as the queue charges it (steps x megapixels: what the GPU spends); engine seconds on this
    # shared CPU are too noisy for a 10 % bound, and are printed beside it.
    gpu = {uid: sum(j.spec.steps * j.spec.pixels for j in first if j.user_id == uid) for uid in (70, 71)}
    seconds = {uid: sum(float(j.timings["total_s"]) for j in first if j.user_id == uid) for uid in (70, 71)}
    share = gpu[70] / (gpu[70] + gpu[71])
    engine_share = seconds[70] / sum(seconds.values())
    print(f"booster's share: {share:.2f} of GPU time, {engine_share:.2f} of engine seconds")
    assert abs(share - 2 / 3) <= 0.1 * 2 / 3, f"GPU time share {share:.2f}, weights say 0.67"
    assert [j.user_id for j in first].count(70) == 6, "twice the weight, twice the job size: as many jobs"


def test_servers_share_by_their_weights_and_members_by_theirs_within_a_server() -> None:
    queue = FairQueue()
    for i in range(300):  # server 1 (weight 3): two members, one with weight 2; server 2 (weight 1): one
        queue.push(1, 1000 + i, cost=1.0, weight=2.0, group=SERVER, group_weight=3.0)
        queue.push(2, 2000 + i, cost=1.0, weight=1.0, group=SERVER, group_weight=3.0)
        queue.push(
            3, 3000 + i, cost=2.0, weight=1.0, group=OTHER_SERVER, group_weight=1.0
        )  # jobs twice as big

    served = [queue.pop() for _ in range(300)]
    gpu = {1: 0.0, 2: 0.0, 3: 0.0}
    for user, _ in (s for s in served if s is not None):
        gpu[user] += 2.0 if user == 3 else 1.0
    total = sum(gpu.values())

    assert abs(gpu[3] / total - 1 / 4) <= 0.1 * 1 / 4, gpu  # server weights 3:1, by GPU time not jobs
    assert abs(gpu[1] / (gpu[1] + gpu[2]) - 2 / 3) <= 0.1 * 2 / 3, gpu
    expected = queue.order()[:3]
    assert [popped[1] for popped in (queue.pop() for _ in range(3)) if popped] == expected, (
        "order() is the pops"
    )


async def test_a_servers_own_limits_and_blocked_terms_apply_there_only_and_survive_a_restart(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    settings = app_settings(tmp_path, make_settings, limits=LIMITS)
    first = await make_app(settings, RecordingEvents(), data_dir)
    try:
        await first.admin.pause(OPERATOR, True)
        await first.admin.set_limit(OPERATOR, "jobs_per_window", 1, server=True)
        await first.admin.block_term(OPERATOR, "dragon", server=True)
        with pytest.raises(UserError, match="not a limit a server sets"):
            await first.admin.set_limit(OPERATOR, "max_queue", 1, server=True)
    finally:
        await first.close()
    app = await make_app(settings, RecordingEvents(), data_dir)
    try:
        here, there = member(80), member(81, guild=OTHER_SERVER, channel=999)
        assert await refusal(app, here) is None
        assert "at most 1 jobs per 10 min" in (await refusal(app, here) or "")
        assert "dragon" in (await refusal_of(app, member(83), "a red dragon") or "")
        assert await refusal(app, there) is None and await refusal(app, there) is None
        assert await refusal_of(app, member(84, guild=OTHER_SERVER, channel=999), "a red dragon") is None
        shown = app.studio.limits_for(SERVER)
        assert (shown.jobs_per_window, app.studio.limits_for(OTHER_SERVER).jobs_per_window) == (1, 100)
        assert (
            app.admin.blocked_terms(OPERATOR, server=True) == ("dragon",) and app.admin.blocked_terms() == ()
        )
    finally:
        await app.close()


async def refusal_of(app: App, who: Requester, prompt: str) -> str | None:
    try:
        await app.studio.imagine(who, GenerationRequest(prompt=prompt))
    except UserError as exc:
        return str(exc)
    return None


async def test_a_servers_own_admins_narrow_the_global_limits_and_never_widen_them(app: App) -> None:
    server_admin = Requester(user_id=9, guild_id=SERVER, channel_id=IMAGES)  # Manage Server, not the operator
    community = app.admin.community

    with pytest.raises(UserError, match="up to the global value"):
        await community.set_role(server_admin, SERVER, "max_queued", "100")
    with pytest.raises(UserError, match="up to the global value"):
        await app.admin.set_limit(server_admin, "jobs_per_window", 1000, server=True)
    with pytest.raises(UserError, match="down to the global value"):
        await app.admin.set_limit(server_admin, "window_s", 1, server=True)
    await community.set_role(server_admin, BOOSTER, "jobs_per_window", "3")
    await app.admin.set_limit(server_admin, "max_queued_per_user", 2, server=True)
    await community.set_role(OPERATOR, PATRON, "jobs_per_window", "1000")  # the operator may

    assert app.studio.limits_for(SERVER).max_queued_per_user == 2
    assert app.studio.member_rule(member(90, PATRON)).jobs_per_window == 1000


async def test_a_role_of_another_server_and_changes_at_the_same_time(app: App) -> None:
    await app.admin.community.set_role(OPERATOR, BOOSTER, "weight", "2")
    elsewhere = Requester(user_id=1, guild_id=OTHER_SERVER, channel_id=999, is_admin=True)
    with pytest.raises(UserError, match="no rule on this server"):
        await app.admin.community.set_role(elsewhere, BOOSTER, "weight", "5")

    await asyncio.gather(
        *(app.admin.community.set_drawing(OPERATOR, channel, True) for channel in range(1, 11))
    )
    await asyncio.gather(
        *(app.admin.block_term(OPERATOR, f"term {word}", server=True) for word in "abcdefghij")
    )

    assert sorted(app.studio.community.channels(SERVER).drawing) == list(range(1, 11)), "no change lost"
    assert len(app.admin.blocked_terms(OPERATOR, server=True)) == 10
    assert app.studio.community.roles_of(SERVER)[BOOSTER].weight == 2.0


async def test_a_servers_own_preset_bounds_and_flagged_image_choice(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path
) -> None:
    settings = app_settings(tmp_path, make_settings, limits=LIMITS)
    server_admin = Requester(user_id=9, guild_id=SERVER, channel_id=IMAGES)
    first = await make_app(settings, RecordingEvents(), data_dir)
    try:
        await first.admin.set_preset(server_admin, "dev", "steps_range", "[1, 10]", server=True)
        with pytest.raises(UserError, match="steps_range goes past the global preset"):
            await first.admin.set_preset(server_admin, "dev", "steps_range", "[1, 80]", server=True)
        await first.admin.set_preset(OPERATOR, "cfg", "nsfw", "true")
        with pytest.raises(UserError, match="nsfw goes past"):
            await first.admin.set_preset(server_admin, "cfg", "nsfw", "false", server=True)
        await first.admin.community.set_flagged(server_admin, "withhold")
        with pytest.raises(UserError, match="stricter, not looser"):
            await first.admin.community.set_flagged(server_admin, "spoiler")
        await first.admin.community.set_flagged(
            Requester(user_id=1, guild_id=OTHER_SERVER, channel_id=999, is_admin=True), "spoiler"
        )
    finally:
        await first.close()
    app = await make_app(settings, RecordingEvents(), data_dir)  # after a restart
    try:
        await app.admin.pause(OPERATOR, True)
        too_many = GenerationRequest(prompt="a fox", preset="dev", steps=20)
        with pytest.raises(UserError, match="between 1 and 10"):
            await app.studio.imagine(member(95), too_many)
        assert await app.studio.imagine(member(96, guild=OTHER_SERVER, channel=999), too_many)
        assert app.studio.rules.catalog.presets["dev"].steps_range == (1, 50), (
            "the global preset is unchanged"
        )
        assert (app.studio.flagged_action(SERVER), app.studio.flagged_action(OTHER_SERVER)) == (
            "withhold",
            "spoiler",
        )
        assert app.studio.flagged_action(None) == "withhold"
    finally:
        await app.close()


async def test_loras_exactly_as_the_role_rules_say(
    tmp_path: Path, make_settings: Callable[..., EngineSettings], data_dir: Path, tiny_dir: Path
) -> None:
    lora_dir = tmp_path / "Lora"
    files = {name: make_lora(tiny_dir, lora_dir, name, seed) for name, seed in (("inky", 1), ("glow", 2))}
    whitelist = tmp_path / "loras.toml"
    whitelist.write_text(
        whitelist_toml(
            {name: {"file": f"{name}.safetensors", "sha256": sha(path)} for name, path in files.items()}
        )
    )
    engine = make_settings(loras_file=whitelist, lora_dir=lora_dir)
    app = await make_app(
        app_settings(tmp_path, lambda **kw: engine, limits=LIMITS), RecordingEvents(), data_dir
    )
    try:
        await app.admin.pause(OPERATOR, True)
        await app.admin.community.set_role(OPERATOR, SERVER, "loras", "inky")
        await app.admin.community.set_role(OPERATOR, BOOSTER, "loras", "glow")

        def asking(lora: str) -> GenerationRequest:
            return GenerationRequest(prompt="a fox", loras=[LoraChoice(name=lora)])

        with pytest.raises(NotAllowed, match="LoRA 'glow'"):
            await app.studio.imagine(member(100), asking("glow"))
        assert await app.studio.imagine(member(101), asking("inky"))
        assert await app.studio.imagine(member(102, BOOSTER), asking("glow"))
        assert await app.studio.imagine(member(103, guild=OTHER_SERVER, channel=999), asking("glow"))
        # A <lora:...> tag in the prompt is the same choice, under the same rules.
        with pytest.raises(NotAllowed, match="LoRA 'glow'"):
            await app.studio.imagine(member(104), GenerationRequest(prompt="a fox <lora:glow:0.5>"))
        tagged = await app.studio.imagine(
            member(105, BOOSTER), GenerationRequest(prompt="a fox <lora:glow:0.5>")
        )
        assert tagged.prompt == "a fox"
    finally:
        await app.close()
