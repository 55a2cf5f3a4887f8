/**
 * Leader election: first with an in-memory LeaseClient (optimistic concurrency on a
 * resourceVersion, as kube-apiserver) and a fake clock, then with `kubeLeaseClient` against a
 * real kube-apiserver (test/helpers/control-plane.ts) and real time.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { once } from 'node:events';
import { createServer, type Socket } from 'node:net';
import { pino } from 'pino';
import t from 'tap';
import { createLeaderElector, formatMicroTime, kubeLeaseClient, LeaseConflictError, type Lease, type LeaseClient, type LeaderElectorOptions } from '../../src/controller/leader-election.ts';
import type { Clock } from '../../src/controller/work-queue.ts';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';

/** Lets all pending continuations run (the fake store answers in microtasks). */
const settle = async () => {
  for (let i = 0; i < 3; i++) await new Promise<void>((r) => setImmediate(r));
};
/** One asynchronous hop, as a request would take. */
const hop = () => Promise.resolve();
const silent = pino({ level: 'silent' });

class FakeClock implements Clock {
  t = Date.UTC(2026, 0, 1);
  #seq = 0;
  readonly #timers = new Map<number, { at: number; fn: () => void }>();
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): unknown {
    const id = ++this.#seq;
    this.#timers.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }
  clearTimeout(handle: unknown): void {
    this.#timers.delete(handle as number);
  }
  /**
   * Runs the timers due up to `ms` from now in deadline order. Timers due at the same instant
   * fire together before continuations run, so candidates polling in step really race.
   */
  async advance(ms: number): Promise<void> {
    const target = this.t + ms;
    for (;;) {
      await settle();
      let at = Infinity;
      for (const timer of this.#timers.values()) if (timer.at <= target) at = Math.min(at, timer.at);
      if (at === Infinity) break;
      this.t = at;
      const due = [...this.#timers].filter(([, timer]) => timer.at === at);
      for (const [id] of due) this.#timers.delete(id);
      for (const [, timer] of due) timer.fn();
    }
    this.t = target;
    await settle();
  }
  /** Advances in `step`s until `cond` holds; returns the time it took. */
  async until(what: string, cond: () => boolean, limitMs: number, step = 50): Promise<number> {
    const start = this.t;
    while (!cond()) {
      if (this.t - start > limitMs) throw new Error(`not within ${limitMs} ms: ${what}`);
      await this.advance(step);
    }
    return this.t - start;
  }
}

/** One Lease in memory: every write bumps the resourceVersion; a stale one is a conflict. */
class LeaseStore {
  lease: Lease | undefined;
  #rv = 0;
  readonly writes: Lease[] = [];

  write(next: Lease): Lease {
    this.lease = { ...next, resourceVersion: String(++this.#rv) };
    this.writes.push(this.lease);
    return { ...this.lease };
  }

  /** A client of the store; `down` makes every call fail, `beforeUpdate` runs before an update. */
  client(): LeaseClient & { down: boolean; beforeUpdate?: () => void; calls: number } {
    const store = this;
    return {
      down: false,
      calls: 0,
      async get() {
        this.calls++;
        await hop();
        if (this.down) throw new Error('connect ECONNREFUSED');
        return store.lease ? { ...store.lease } : undefined;
      },
      async create(lease) {
        this.calls++;
        await hop();
        if (this.down) throw new Error('connect ECONNREFUSED');
        if (store.lease) throw new LeaseConflictError('already exists');
        return store.write(lease);
      },
      async update(lease) {
        this.calls++;
        await hop();
        if (this.down) throw new Error('connect ECONNREFUSED');
        this.beforeUpdate?.();
        if (!store.lease || store.lease.resourceVersion !== lease.resourceVersion) throw new LeaseConflictError('the object has been modified');
        return store.write(lease);
      },
    };
  }
}

interface Candidate {
  readonly id: string;
  readonly client: ReturnType<LeaseStore['client']>;
  readonly ac: AbortController;
  readonly done: Promise<void>;
  readonly events: string[];
  readonly leading: boolean;
  /** The signal given to the last onStartedLeading. */
  readonly signal: AbortSignal | undefined;
  startedAt: number | undefined;
  stoppedAt: number | undefined;
}

function candidate(store: LeaseStore, id: string, clock: FakeClock, extra: Partial<LeaderElectorOptions> = {}): Candidate {
  const client = store.client();
  const ac = new AbortController();
  let signal: AbortSignal | undefined;
  const events: string[] = [];
  const c: Candidate = {
    id,
    client,
    ac,
    events,
    done: Promise.resolve(),
    get leading() {
      return elector.isLeader;
    },
    get signal() {
      return signal;
    },
    startedAt: undefined,
    stoppedAt: undefined,
  };
  const elector = createLeaderElector({
    lease: client,
    name: 'kmm-preflight',
    namespace: 'kmm-operator-system',
    identity: id,
    leaseDurationSeconds: 15,
    renewDeadlineSeconds: 10,
    retryPeriodSeconds: 2,
    logger: silent,
    clock,
    onStartedLeading: (s) => {
      signal = s;
      c.startedAt = clock.now();
      events.push('started');
    },
    onStoppedLeading: () => {
      c.stoppedAt = clock.now();
      events.push('stopped');
    },
    onNewLeader: (l) => events.push(`leader:${l}`),
    ...extra,
  });
  (c as { done: Promise<void> }).done = elector.run(ac.signal);
  return c;
}

const renewMs = (l: Lease | undefined) => Date.parse(l?.renewTime ?? '');

t.test('MicroTime strings have six fractional digits', async (t) => {
  t.equal(formatMicroTime(Date.UTC(2026, 0, 1)), '2026-01-01T00:00:00.000000Z');
  t.equal(formatMicroTime(Date.UTC(2026, 6, 4, 12, 30, 5, 123)), '2026-07-04T12:30:05.123000Z');
});

t.test('durations must satisfy leaseDuration > renewDeadline > retryPeriod > 0', async (t) => {
  const base = { lease: new LeaseStore().client(), name: 'l', namespace: 'ns', identity: 'a', logger: silent, onStartedLeading: () => undefined, onStoppedLeading: () => undefined };
  t.throws(() => createLeaderElector({ ...base, leaseDurationSeconds: 10, renewDeadlineSeconds: 10 }), RangeError);
  t.throws(() => createLeaderElector({ ...base, renewDeadlineSeconds: 2, retryPeriodSeconds: 2 }), RangeError);
  t.throws(() => createLeaderElector({ ...base, retryPeriodSeconds: 0 }), RangeError);
  t.throws(() => createLeaderElector({ ...base, identity: '' }), RangeError);
  t.doesNotThrow(() => createLeaderElector(base), 'the defaults 15/10/2 are fine');
});

t.test('of two electors only one leads; it renews every retryPeriod and the other follows it', async (t) => {
  const clock = new FakeClock();
  const store = new LeaseStore();
  const a = candidate(store, 'pod-a', clock);
  const b = candidate(store, 'pod-b', clock);
  await clock.advance(60_000);
  const leaders = [a, b].filter((c) => c.leading);
  t.equal(leaders.length, 1, 'exactly one leads');
  const leader = leaders[0]!;
  const standby = leader === a ? b : a;
  t.same(leader.events, ['leader:' + leader.id, 'started']);
  t.same(standby.events, ['leader:' + leader.id], 'the standby saw the leader and never started');
  t.match(store.lease, { holderIdentity: leader.id, leaseDurationSeconds: 15, leaseTransitions: 0, acquireTime: '2026-01-01T00:00:00.000000Z' });
  t.ok(clock.now() - renewMs(store.lease) <= 2000, `renewed within the last retryPeriod (${store.lease?.renewTime})`);
  const renewals = store.writes.filter((w) => w.holderIdentity === leader.id).length;
  t.ok(renewals >= 29 && renewals <= 31, `about one renewal per 2 s (${renewals} writes in 60 s)`);
  a.ac.abort();
  b.ac.abort();
  await Promise.all([a.done, b.done]);
});

t.test('a crashed leader (no release): the standby takes over once the lease has expired, not before', async (t) => {
  const clock = new FakeClock();
  const store = new LeaseStore();
  const a = candidate(store, 'pod-a', clock, { releaseOnCancel: false });
  await clock.until('a leads', () => a.leading, 10_000);
  const b = candidate(store, 'pod-b', clock);
  await clock.advance(30_000);
  t.equal(b.leading, false, 'b stands by while a renews');

  // The crash: a's loops stop and it releases nothing.
  a.ac.abort();
  await a.done;
  const crashedAt = clock.now();
  const lastRenewal = renewMs(store.lease);
  t.equal(store.lease?.holderIdentity, 'pod-a', 'the lease still names a');
  const took = await clock.until('b leads', () => b.leading, 30_000);
  t.ok(b.startedAt! >= lastRenewal + 15_000, `not before leaseDuration after a's last renewal (${b.startedAt! - lastRenewal} ms)`);
  t.ok(took <= 15_000 + 2 * 2000, `b leads ${took} ms after the crash: within leaseDuration + 2 retryPeriods`);
  t.match(store.lease, { holderIdentity: 'pod-b', leaseTransitions: 1, acquireTime: formatMicroTime(b.startedAt!) });
  t.same(b.events, ['leader:pod-a', 'leader:pod-b', 'started']);
  t.ok(crashedAt <= b.startedAt!);
  b.ac.abort();
  await b.done;
});

t.test('graceful stop: the work ends first, then the lease is released and the standby takes over within one retryPeriod', async (t) => {
  const clock = new FakeClock();
  const store = new LeaseStore();
  let workEnded: number | undefined;
  const a = candidate(store, 'pod-a', clock, {
    // The work takes 3 s to wind down after its signal aborts.
    onStartedLeading: (signal) =>
      new Promise<void>((resolve) => {
        signal.addEventListener('abort', () => clock.setTimeout(() => ((workEnded = clock.now()), resolve()), 3000));
      }),
  });
  await clock.until('a leads', () => a.leading, 10_000);
  const b = candidate(store, 'pod-b', clock);
  await clock.advance(10_000);
  t.equal(b.leading, false);

  const stopAt = clock.now();
  a.ac.abort();
  await clock.advance(2_900);
  t.equal(store.lease?.holderIdentity, 'pod-a', 'still held while the work winds down');
  t.ok(clock.now() - renewMs(store.lease) <= 2000, 'and still renewed meanwhile');
  await clock.advance(100);
  await a.done;
  t.equal(workEnded, stopAt + 3000);
  t.match(store.writes.at(-1), { holderIdentity: '', leaseDurationSeconds: 1 }, 'released: empty holder, 1 s duration');
  t.ok(a.events.at(-1) === 'stopped' && a.stoppedAt! >= workEnded!, 'onStoppedLeading after the work ended');

  const releasedAt = clock.now();
  await clock.until('b leads', () => b.leading, 10_000, 10);
  t.ok(b.startedAt! - releasedAt <= 2000, `b leads ${b.startedAt! - releasedAt} ms after the release: within one retryPeriod`);
  t.match(store.lease, { holderIdentity: 'pod-b', leaseTransitions: 1 });
  b.ac.abort();
  await b.done;
});

t.test('a leader that cannot renew steps down within renewDeadline, before the standby takes over', async (t) => {
  const clock = new FakeClock();
  const store = new LeaseStore();
  const a = candidate(store, 'pod-a', clock);
  await clock.until('a leads', () => a.leading, 10_000);
  const b = candidate(store, 'pod-b', clock);
  await clock.advance(20_000);
  const lastRenewal = renewMs(store.lease);

  a.client.down = true; // a partition: a cannot reach the API server, b can
  await clock.until('a steps down', () => a.events.includes('stopped'), 20_000);
  t.equal(a.signal?.aborted, true, "a's work signal is aborted");
  t.ok(a.stoppedAt! <= lastRenewal + 10_000, `a stepped down ${a.stoppedAt! - lastRenewal} ms after its last renewal (renewDeadline 10 s)`);
  t.equal(b.leading, false, 'b has not taken over yet');
  await clock.until('b leads', () => b.leading, 20_000);
  t.ok(b.startedAt! > a.stoppedAt!, `no overlap: a stopped ${b.startedAt! - a.stoppedAt!} ms before b started`);

  a.client.down = false;
  await clock.advance(20_000);
  t.equal(a.leading, false, 'a, reachable again, is a standby');
  t.same(a.events, ['leader:pod-a', 'started', 'stopped', 'leader:pod-b']);
  a.ac.abort();
  b.ac.abort();
  await Promise.all([a.done, b.done]);
});

t.test('conflicts on update are handled: lost races, and renewals after a foreign write', async (t) => {
  const clock = new FakeClock();
  const store = new LeaseStore();
  // An expired lease of a pod that is gone: both candidates wait leaseDuration, then race.
  store.write({ holderIdentity: 'pod-gone', leaseDurationSeconds: 15, renewTime: formatMicroTime(clock.now() - 3_600_000), leaseTransitions: 4 });
  const a = candidate(store, 'pod-a', clock);
  const b = candidate(store, 'pod-b', clock);
  let conflicts = 0;
  for (const c of [a, b]) {
    const inner = c.client.update.bind(c.client);
    c.client.update = async (lease) => {
      try {
        return await inner(lease);
      } catch (err) {
        if (err instanceof LeaseConflictError) conflicts++;
        throw err;
      }
    };
  }
  await clock.advance(14_000);
  t.equal(a.leading || b.leading, false, 'nobody takes a lease observed less than leaseDuration ago');
  await clock.advance(6_000);
  const leaders = [a, b].filter((c) => c.leading);
  t.equal(leaders.length, 1, 'exactly one won the race');
  t.ok(conflicts >= 1, `the loser's update was a conflict (${conflicts})`);
  t.match(store.lease, { holderIdentity: leaders[0]!.id, leaseTransitions: 5 });

  // Someone else writes the Lease (a label, say): the leader's next renewal conflicts, reads, and renews.
  const leader = leaders[0]!;
  let foreign = true;
  leader.client.beforeUpdate = () => {
    if (foreign && store.lease) {
      foreign = false;
      store.write({ ...store.lease });
    }
  };
  const before = conflicts;
  await clock.advance(10_000);
  t.ok(conflicts > before, 'the renewal met a conflict');
  t.equal(leader.leading, true, 'and the leader still leads');
  t.same(leader.events.filter((e) => e === 'stopped'), [], 'without a stop');
  t.ok(clock.now() - renewMs(store.lease) <= 2000, 'renewals continue');
  a.ac.abort();
  b.ac.abort();
  await Promise.all([a.done, b.done]);
});

t.test('kubeLeaseClient aborts a hanging request with its signal', async (t) => {
  // A server that accepts connections and never answers.
  const sockets: Socket[] = [];
  const closed: Promise<unknown>[] = [];
  const server = createServer((socket) => {
    sockets.push(socket);
    closed.push(once(socket, 'close'));
    socket.resume(); // read (and drop) the request, so that the client's FIN is seen
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  const { port } = server.address() as { port: number };
  const kc = new KubeConfig();
  kc.loadFromOptions({
    clusters: [{ name: 'c', server: `http://127.0.0.1:${port}`, skipTLSVerify: true }],
    users: [{ name: 'u' }],
    contexts: [{ name: 'x', cluster: 'c', user: 'u' }],
    currentContext: 'x',
  });
  const client = kubeLeaseClient(kc, 'ns', 'l');
  const started = Date.now();
  const err = await client.get(AbortSignal.timeout(200)).then(
    () => undefined,
    (e: unknown) => e as Error,
  );
  t.match(err?.message, /^reading Lease ns\/l: /, `rejected: ${err?.message}`);
  t.notMatch(err?.message, /answered/, 'an abort is not mistaken for an HTTP status');
  t.ok(Date.now() - started < 2000, `rejected after ${Date.now() - started} ms`);
  t.equal(sockets.length, 1, 'the request reached the server');
  await closed[0];
  t.pass('and its connection was closed: the request was cancelled, not just abandoned');
});

t.test('against a real kube-apiserver: one leads, the Lease shows it, a crash hands over, a release hands over at once', async (t) => {
  t.setTimeout(30 * 60_000); // includes building kube-apiserver when its cache is cold
  let plane: ControlPlane | undefined;
  try {
    plane = await startControlPlane();
  } catch (err) {
    t.fail(`the test control plane did not start: ${(err as Error).message}`);
    return;
  }
  t.teardown(() => plane?.stop());
  const kube = plane;
  const ns = 'kmm-preflight-le';
  const leaseName = 'kmm-preflight-controller';
  const created = await kube.kubectl(['create', 'namespace', ns]);
  t.equal(created.code, 0, created.stderr);
  const kc = new KubeConfig();
  kc.loadFromFile(kube.kubeconfig);

  // The client alone: 404 reads as no Lease, 409 on create and a stale update are conflicts.
  const probe = kubeLeaseClient(kc, ns, 'probe');
  t.equal(await probe.get(), undefined, 'a missing Lease reads as undefined');
  const stamp = formatMicroTime(Date.now());
  const first = await probe.create({ holderIdentity: 'x', leaseDurationSeconds: 5, acquireTime: stamp, renewTime: stamp, leaseTransitions: 0 });
  t.match(first, { holderIdentity: 'x', leaseDurationSeconds: 5, renewTime: stamp, acquireTime: stamp, leaseTransitions: 0, resourceVersion: /^\d+$/ }, 'MicroTime strings round-trip');
  await t.rejects(probe.create({ holderIdentity: 'y' }), LeaseConflictError, 'creating an existing Lease is a conflict');
  const second = await probe.update({ ...first, holderIdentity: 'y' });
  t.equal(second.holderIdentity, 'y');
  await t.rejects(probe.update({ ...first, holderIdentity: 'z' }), LeaseConflictError, 'a stale resourceVersion is a conflict');
  t.equal((await probe.get())?.holderIdentity, 'y');

  const LEASE = 3;
  const RENEW = 2;
  const RETRY = 0.5;
  const state = new Map<string, { leading: boolean; startedAt?: number }>();
  const runs: Promise<void>[] = [];
  const start = (id: string, releaseOnCancel: boolean) => {
    const ac = new AbortController();
    state.set(id, { leading: false });
    runs.push(
      createLeaderElector({
        lease: kubeLeaseClient(kc, ns, leaseName),
        name: leaseName,
        namespace: ns,
        identity: id,
        leaseDurationSeconds: LEASE,
        renewDeadlineSeconds: RENEW,
        retryPeriodSeconds: RETRY,
        releaseOnCancel,
        logger: silent,
        onStartedLeading: () => void state.set(id, { leading: true, startedAt: Date.now() }),
        onStoppedLeading: () => void state.set(id, { leading: false }),
      }).run(ac.signal),
    );
    return ac;
  };
  const waitFor = async (what: string, cond: () => boolean, timeoutMs: number) => {
    const deadline = Date.now() + timeoutMs;
    while (!cond()) {
      if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  const getLease = async () => {
    const r = await kube.kubectl(['-n', ns, 'get', 'lease', leaseName, '-o', 'json']);
    t.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout) as { spec: { holderIdentity?: string; leaseDurationSeconds?: number; leaseTransitions?: number; renewTime?: string; acquireTime?: string } };
  };
  const leading = () => [...state].filter(([, s]) => s.leading).map(([id]) => id);

  const stopA = start('pod-a', false);
  await waitFor('pod-a to lead', () => state.get('pod-a')!.leading, 10_000);
  const stopB = start('pod-b', true);
  await new Promise((r) => setTimeout(r, 2 * LEASE * 1000));
  t.same(leading(), ['pod-a'], 'only pod-a leads');
  const held = await getLease();
  t.match(held.spec, { holderIdentity: 'pod-a', leaseDurationSeconds: LEASE, leaseTransitions: 0 }, 'the Lease object shows pod-a');
  t.match(held.spec.renewTime, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/, `renewTime is a MicroTime (${held.spec.renewTime})`);
  t.ok(Date.now() - Date.parse(held.spec.renewTime!) < 2000, 'and recent');
  // A label added by someone else survives the leader's renewals (conflict, read, replace).
  const labelled = await kube.kubectl(['-n', ns, 'label', 'lease', leaseName, 'team=kmm']);
  t.equal(labelled.code, 0, labelled.stderr);
  await new Promise((r) => setTimeout(r, 4 * RETRY * 1000));
  const relabelled = (await getLease()) as { metadata?: { labels?: Record<string, string> }; spec: { holderIdentity?: string; renewTime?: string } };
  t.equal(relabelled.metadata?.labels?.['team'], 'kmm', 'the label is kept');
  t.ok(Date.now() - Date.parse(relabelled.spec.renewTime!) < 2000, 'and renewals went on after the conflict');
  t.same(leading(), ['pod-a'], 'pod-a still leads');

  // Kill the leader: its loops stop and the Lease is left as it was.
  stopA.abort();
  const killedAt = Date.now();
  await waitFor('pod-b to lead', () => state.get('pod-b')!.leading, 15_000);
  const takeover = state.get('pod-b')!.startedAt! - killedAt;
  t.comment(`crash takeover after ${takeover} ms (leaseDuration ${LEASE} s, retryPeriod ${RETRY} s)`);
  t.ok(takeover >= (LEASE - RETRY) * 1000 - 100, 'the standby waited for the lease to expire');
  // client-go's rule counts leaseDuration from when the standby *observed* the last renewal, up
  // to one poll after it was written: leaseDuration + 2 retryPeriods, plus request latency.
  t.ok(takeover <= (LEASE + 2 * RETRY) * 1000 + 500, `within leaseDuration + 2 retryPeriods (+0.5 s)`);
  t.match((await getLease()).spec, { holderIdentity: 'pod-b', leaseTransitions: 1 });

  // A graceful stop releases the Lease: a third candidate takes it at its next poll.
  const stopC = start('pod-c', true);
  await new Promise((r) => setTimeout(r, 1500));
  t.same(leading(), ['pod-b'], 'pod-c stands by');
  stopB.abort();
  const stoppedAt = Date.now();
  await waitFor('pod-c to lead', () => state.get('pod-c')!.leading, 10_000);
  const handover = state.get('pod-c')!.startedAt! - stoppedAt;
  t.comment(`release handover after ${handover} ms`);
  t.ok(handover <= RETRY * 1000 + 500, `within one retryPeriod (+0.5 s)`);
  t.match((await getLease()).spec, { holderIdentity: 'pod-c', leaseTransitions: 2 });

  stopC.abort();
  await Promise.all(runs);
  t.match((await getLease()).spec, { holderIdentity: '', leaseDurationSeconds: 1 }, 'released on the way out');
});
