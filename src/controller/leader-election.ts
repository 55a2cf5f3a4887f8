/**
 * Leader election through a `coordination.k8s.io/v1` Lease, with the semantics of client-go's
 * `tools/leaderelection` (see docs/adr/0009-leader-election.md): @kubernetes/client-node has no
 * leader election.
 *
 * - A candidate reads the Lease every `retryPeriod`. It takes the Lease when there is none, when
 *   its holder is empty (released), or when the record has not changed for `leaseDuration` *as
 *   measured by this process's clock from when it observed the change* (client-go's rule: the
 *   holder's `renewTime` is written and shown but not trusted, so clock skew between replicas
 *   cannot shorten a lease). Every write is an optimistic update on `resourceVersion`; a
 *   conflict means another candidate won the race.
 * - The leader renews every `retryPeriod`. If no renewal has succeeded for `renewDeadline`, it
 *   steps down: the signal given to `onStartedLeading` aborts and `onStoppedLeading` is called.
 *   `leaseDuration > renewDeadline` leaves the gap in which a leader that cannot reach the API
 *   server stops working before a standby may take over.
 * - On a graceful stop (the `run` signal aborts), the leader aborts its work, waits for the
 *   promise `onStartedLeading` returned, then releases the Lease (empty holder,
 *   `leaseDurationSeconds: 1`) so that a standby takes over at its next poll.
 *
 * Unlike client-go's `Run`, `run` goes back to being a candidate after losing the lease (once the
 * previous term's work has settled) and returns only when its signal aborts.
 */
import { ApiException, CoordinationV1Api, Observable, type ConfigurationOptions, type KubeConfig, type V1Lease, type V1MicroTime } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { systemClock, type Clock } from './work-queue.ts';

/** The fields of a Lease that leader election reads and writes. Times are MicroTime strings. */
export interface Lease {
  readonly holderIdentity?: string;
  readonly leaseDurationSeconds?: number;
  /** RFC 3339 with microseconds, e.g. `2026-01-01T00:00:00.000000Z` ({@link formatMicroTime}). */
  readonly acquireTime?: string;
  readonly renewTime?: string;
  readonly leaseTransitions?: number;
  /** The object's `metadata.resourceVersion`; `update` must be given the one it read. */
  readonly resourceVersion?: string;
}

/** A write lost a race: `create` found the Lease existing, `update` a newer resourceVersion. */
export class LeaseConflictError extends Error {
  override readonly name = 'LeaseConflictError';
}

/** The one Lease an elector uses. */
export interface LeaseClient {
  /** The Lease, or undefined when it does not exist. */
  get(signal?: AbortSignal): Promise<Lease | undefined>;
  /** Creates the Lease; rejects with {@link LeaseConflictError} when it exists. */
  create(lease: Lease, signal?: AbortSignal): Promise<Lease>;
  /**
   * Replaces the Lease; rejects with {@link LeaseConflictError} when `lease.resourceVersion` is
   * stale (or the Lease is gone).
   */
  update(lease: Lease, signal?: AbortSignal): Promise<Lease>;
}

/** A MicroTime as kube-apiserver parses it: RFC 3339 with exactly six fractional digits. */
export function formatMicroTime(ms: number): string {
  // toISOString has milliseconds; MicroTime wants microseconds, which Date does not have.
  return new Date(ms).toISOString().replace(/Z$/, '000Z');
}

export interface LeaderElectorOptions {
  readonly lease: LeaseClient;
  /** Name and namespace of the Lease, for logs. */
  readonly name: string;
  readonly namespace: string;
  /** Unique per process (pod name plus a random suffix): two processes must never share it. */
  readonly identity: string;
  /** How long a standby waits after the last observed change before taking over; default 15. */
  readonly leaseDurationSeconds?: number;
  /** How long the leader keeps trying to renew before it steps down; default 10. */
  readonly renewDeadlineSeconds?: number;
  /** Interval of renewals and of a standby's polls; default 2. */
  readonly retryPeriodSeconds?: number;
  /**
   * Release the Lease on a graceful stop (default true). False leaves it to expire, as a crash
   * would: for tests, or when the work cannot be known to have stopped.
   */
  readonly releaseOnCancel?: boolean;
  /**
   * Called on becoming leader. `signal` aborts when leadership ends (lost or stopping). On a
   * graceful stop, the Lease is released only after the returned promise settles.
   */
  onStartedLeading(signal: AbortSignal): void | Promise<void>;
  /** Called when a term ends, after `onStartedLeading`'s signal has aborted. */
  onStoppedLeading(): void;
  /** Called with the holder's identity whenever an observed holder differs from the last one. */
  onNewLeader?(identity: string): void;
  readonly logger: Logger;
  /** Milliseconds since the epoch; default `clock.now`. */
  readonly now?: () => number;
  /** Timers (and time, unless `now` is given); default the system clock. */
  readonly clock?: Clock;
}

export interface LeaderElector {
  /** Campaigns, leads, and campaigns again after a lost term, until `signal` aborts. */
  run(signal: AbortSignal): Promise<void>;
  /** Whether this process is leading (false as soon as a term is ending). */
  readonly isLeader: boolean;
  /** The last observed holder, if any. */
  readonly leader: string | undefined;
}

/** The record fields whose change counts as a renewal (client-go compares the whole record). */
function sameRecord(a: Lease | undefined, b: Lease | undefined): boolean {
  if (!a || !b) return a === b;
  return (
    (a.holderIdentity ?? '') === (b.holderIdentity ?? '') &&
    a.renewTime === b.renewTime &&
    a.acquireTime === b.acquireTime &&
    (a.leaseTransitions ?? 0) === (b.leaseTransitions ?? 0) &&
    a.leaseDurationSeconds === b.leaseDurationSeconds
  );
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Creates an elector; nothing happens until `run`. */
export function createLeaderElector(o: LeaderElectorOptions): LeaderElector {
  const leaseMs = (o.leaseDurationSeconds ?? 15) * 1000;
  const renewMs = (o.renewDeadlineSeconds ?? 10) * 1000;
  const retryMs = (o.retryPeriodSeconds ?? 2) * 1000;
  if (!(retryMs > 0 && renewMs > retryMs && leaseMs > renewMs)) {
    throw new RangeError(`leader election needs leaseDuration > renewDeadline > retryPeriod > 0 (got ${leaseMs / 1000}, ${renewMs / 1000}, ${retryMs / 1000} s)`);
  }
  const clock = o.clock ?? systemClock;
  const now = o.now ?? (() => clock.now());
  const client = o.lease;
  const identity = o.identity;
  if (!identity) throw new RangeError('leader election needs a non-empty identity');
  const leaseSeconds = leaseMs / 1000;
  const log = o.logger.child({ lease: `${o.namespace}/${o.name}`, identity });

  /** The last record read or written, and when (by our clock) it was first seen as it is. */
  let observed: Lease | undefined;
  let observedTime = 0;
  /** When the last successful write of ours was started: the base of the renew deadline. */
  let lastSuccess = 0;
  let leading = false;
  let reported: string | undefined;
  let running = false;

  const observe = (lease: Lease | undefined, t: number) => {
    if (!sameRecord(lease, observed)) observedTime = t;
    observed = lease;
    const holder = lease?.holderIdentity ?? '';
    if (holder !== '' && holder !== reported) {
      reported = holder;
      log.info({ leader: holder }, holder === identity ? 'this process is the leader' : `new leader observed: ${holder}`);
      try {
        o.onNewLeader?.(holder);
      } catch (err) {
        log.error({ err: messageOf(err) }, 'onNewLeader threw');
      }
    }
  };

  /** Resolves after `ms` or when `signal` aborts, whichever is first; never rejects. */
  const sleep = (ms: number, signal: AbortSignal) =>
    new Promise<void>((resolve) => {
      if (signal.aborted) return resolve();
      const done = () => {
        clock.clearTimeout(timer);
        signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = clock.setTimeout(done, ms);
      signal.addEventListener('abort', done, { once: true });
    });

  /**
   * Runs `call` with a signal that aborts with `parent` or after `ms`, and rejects when that
   * signal aborts even if the client ignores it: an attempt never outlives its deadline.
   */
  const bounded = async <T>(parent: AbortSignal, ms: number, call: (signal: AbortSignal) => Promise<T>): Promise<T> => {
    const ac = new AbortController();
    const onParent = () => ac.abort(parent.reason);
    if (parent.aborted) ac.abort(parent.reason);
    else parent.addEventListener('abort', onParent, { once: true });
    const timer = clock.setTimeout(() => ac.abort(new Error(`lease request timed out after ${ms} ms`)), ms);
    let onAbort: (() => void) | undefined;
    try {
      return await Promise.race([
        call(ac.signal),
        new Promise<never>((_, reject) => {
          onAbort = () => reject(ac.signal.reason);
          if (ac.signal.aborted) onAbort();
          else ac.signal.addEventListener('abort', onAbort, { once: true });
        }),
      ]);
    } finally {
      clock.clearTimeout(timer);
      parent.removeEventListener('abort', onParent);
      if (onAbort) ac.signal.removeEventListener('abort', onAbort);
    }
  };

  /**
   * One attempt, as client-go's tryAcquireOrRenew: create the Lease, renew ours, or take one
   * that is free or expired. True when this process holds the Lease afterwards.
   */
  const tryAcquireOrRenew = async (signal: AbortSignal): Promise<boolean> => {
    const t = now();
    const stamp = formatMicroTime(t);
    // Fast path while holding it: one update on the record we wrote last. A conflict means
    // someone else wrote; read it below to see who.
    if (observed?.holderIdentity === identity && observed.resourceVersion !== undefined) {
      try {
        const r = await client.update({ ...observed, leaseDurationSeconds: leaseSeconds, renewTime: stamp }, signal);
        observe(r, t);
        lastSuccess = t;
        return true;
      } catch (err) {
        if (!(err instanceof LeaseConflictError)) throw err;
      }
    }
    const current = await client.get(signal);
    if (!current) {
      try {
        const r = await client.create({ holderIdentity: identity, leaseDurationSeconds: leaseSeconds, acquireTime: stamp, renewTime: stamp, leaseTransitions: 0 }, signal);
        observe(r, t);
        lastSuccess = t;
        return true;
      } catch (err) {
        if (err instanceof LeaseConflictError) return false;
        throw err;
      }
    }
    observe(current, t);
    const holder = current.holderIdentity ?? '';
    if (holder !== '' && holder !== identity && observedTime + leaseMs > t) return false;
    const ours = holder === identity;
    const next: Lease = {
      holderIdentity: identity,
      leaseDurationSeconds: leaseSeconds,
      acquireTime: ours ? (current.acquireTime ?? stamp) : stamp,
      renewTime: stamp,
      leaseTransitions: ours ? (current.leaseTransitions ?? 0) : (current.leaseTransitions ?? 0) + 1,
      ...(current.resourceVersion !== undefined ? { resourceVersion: current.resourceVersion } : {}),
    };
    try {
      const r = await client.update(next, signal);
      observe(r, t);
      lastSuccess = t;
      return true;
    } catch (err) {
      if (err instanceof LeaseConflictError) return false;
      throw err;
    }
  };

  /** tryAcquireOrRenew bounded by `ms`, with errors logged and taken as failure. */
  const attempt = async (stop: AbortSignal, ms: number): Promise<boolean> => {
    try {
      return await bounded(stop, ms, tryAcquireOrRenew);
    } catch (err) {
      if (!stop.aborted) log.warn({ err: messageOf(err) }, `lease request failed: ${messageOf(err)}`);
      return false;
    }
  };

  /** Polls until the Lease is ours (true) or `signal` aborts (false). */
  const campaign = async (signal: AbortSignal): Promise<boolean> => {
    log.info('waiting to acquire the lease');
    while (!signal.aborted) {
      if (await attempt(signal, renewMs)) return !signal.aborted;
      await sleep(retryMs, signal);
    }
    return false;
  };

  /** Renews every retryPeriod until `stop` aborts ('stopped') or renewal fails for renewDeadline ('lost'). */
  const renewLoop = async (stop: AbortSignal): Promise<'stopped' | 'lost'> => {
    for (;;) {
      await sleep(retryMs, stop);
      if (stop.aborted) return 'stopped';
      for (;;) {
        const remaining = lastSuccess + renewMs - now();
        if (remaining <= 0) return 'lost';
        const ok = await attempt(stop, remaining);
        if (stop.aborted) return 'stopped';
        if (ok) break;
        // Someone else holds it now: no point retrying until the deadline.
        const holder = observed?.holderIdentity ?? '';
        if (holder !== '' && holder !== identity) return 'lost';
        const left = lastSuccess + renewMs - now();
        if (left <= 0) return 'lost';
        await sleep(Math.min(retryMs, left), stop);
        if (stop.aborted) return 'stopped';
      }
    }
  };

  /** Gives the Lease up so that a standby takes it at its next poll (client-go's release). */
  const release = async () => {
    for (let i = 0; i < 2; i++) {
      if (observed?.holderIdentity !== identity) return;
      const t = now();
      const stamp = formatMicroTime(t);
      const released: Lease = {
        holderIdentity: '',
        leaseDurationSeconds: 1,
        acquireTime: stamp,
        renewTime: stamp,
        leaseTransitions: observed.leaseTransitions ?? 0,
        ...(observed.resourceVersion !== undefined ? { resourceVersion: observed.resourceVersion } : {}),
      };
      try {
        const r = await bounded(new AbortController().signal, renewMs, (s) => client.update(released, s));
        observe(r, t);
        log.info('lease released');
        return;
      } catch (err) {
        if (!(err instanceof LeaseConflictError)) {
          log.warn({ err: messageOf(err) }, `could not release the lease (a standby takes over when it expires): ${messageOf(err)}`);
          return;
        }
        // Our view was stale (e.g. an aborted renewal went through): read, and release if still ours.
        try {
          observe(await bounded(new AbortController().signal, renewMs, (s) => client.get(s)), now());
        } catch (getErr) {
          log.warn({ err: messageOf(getErr) }, `could not release the lease: ${messageOf(getErr)}`);
          return;
        }
      }
    }
  };

  /** One term: work and renewals until the lease is lost or `runSignal` aborts. */
  const lead = async (runSignal: AbortSignal): Promise<void> => {
    leading = true;
    const term = new AbortController();
    const stopRenewing = new AbortController();
    log.info('started leading');
    const work = (async () => o.onStartedLeading(term.signal))().catch((err: unknown) => {
      log.error({ err: messageOf(err) }, `onStartedLeading failed: ${messageOf(err)}`);
    });
    // A graceful stop ends the work first and keeps renewing meanwhile, so that the Lease is
    // released only when nothing guarded by it runs any more.
    const onRunAbort = () => {
      leading = false;
      term.abort(runSignal.reason);
      void work.finally(() => stopRenewing.abort());
    };
    if (runSignal.aborted) onRunAbort();
    else runSignal.addEventListener('abort', onRunAbort, { once: true });
    const outcome = await renewLoop(stopRenewing.signal);
    runSignal.removeEventListener('abort', onRunAbort);
    leading = false;
    if (outcome === 'lost') {
      log.warn({ renewDeadlineSeconds: renewMs / 1000 }, 'leadership lost: the lease could not be renewed in time');
      term.abort(new Error('leadership lost'));
      stopped();
      await work;
      return;
    }
    await work;
    if (o.releaseOnCancel ?? true) await release();
    stopped();
  };

  const stopped = () => {
    log.info('stopped leading');
    try {
      o.onStoppedLeading();
    } catch (err) {
      log.error({ err: messageOf(err) }, 'onStoppedLeading threw');
    }
  };

  return {
    async run(signal) {
      if (running) throw new Error('this leader elector is already running');
      running = true;
      try {
        while (!signal.aborted) {
          if (!(await campaign(signal))) break;
          await lead(signal);
        }
      } finally {
        running = false;
      }
    },
    get isLeader() {
      return leading;
    },
    get leader() {
      const h = observed?.holderIdentity;
      return h ? h : undefined;
    },
  };
}

// --- Kubernetes --------------------------------------------------------------------------------

/** kube-apiserver returns MicroTime strings; client-node types them as Date. Accept both. */
function microTimeString(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v instanceof Date) return formatMicroTime(v.getTime());
  return undefined;
}

/**
 * The HTTP status of a client-node ApiException. Only that: an aborted fetch rejects with a
 * DOMException, whose legacy `code` (23 for TimeoutError) is no HTTP status.
 */
function statusOf(err: unknown): number | undefined {
  return err instanceof ApiException ? err.code : undefined;
}

/** A request option that aborts the HTTP request with `signal` (client-node passes it to fetch). */
function withSignal(signal: AbortSignal | undefined): ConfigurationOptions | undefined {
  if (!signal) return undefined;
  return {
    middleware: [
      {
        pre: (ctx) => {
          ctx.setSignal(signal);
          return new Observable(Promise.resolve(ctx));
        },
        post: (rsp) => new Observable(Promise.resolve(rsp)),
      },
    ],
    middlewareMergeStrategy: 'append',
  };
}

/**
 * The {@link LeaseClient} of one Lease through @kubernetes/client-node: 404 reads as no Lease,
 * 409 (and 404 on update) as {@link LeaseConflictError}. Labels and annotations of the Lease are
 * kept on update.
 */
export function kubeLeaseClient(kc: KubeConfig, namespace: string, name: string): LeaseClient {
  const api = kc.makeApiClient(CoordinationV1Api);
  /** The last object seen, to keep its other fields when replacing. */
  let last: V1Lease | undefined;

  const toLease = (l: V1Lease): Lease => {
    last = l;
    const s = l.spec ?? {};
    const acquireTime = microTimeString(s.acquireTime);
    const renewTime = microTimeString(s.renewTime);
    return {
      ...(s.holderIdentity !== undefined ? { holderIdentity: s.holderIdentity } : {}),
      ...(s.leaseDurationSeconds !== undefined ? { leaseDurationSeconds: s.leaseDurationSeconds } : {}),
      ...(acquireTime !== undefined ? { acquireTime } : {}),
      ...(renewTime !== undefined ? { renewTime } : {}),
      ...(s.leaseTransitions !== undefined ? { leaseTransitions: s.leaseTransitions } : {}),
      ...(l.metadata?.resourceVersion !== undefined ? { resourceVersion: l.metadata.resourceVersion } : {}),
    };
  };

  const toV1 = (lease: Lease): V1Lease => {
    const base = last?.metadata?.resourceVersion === lease.resourceVersion ? last : undefined;
    return {
      apiVersion: 'coordination.k8s.io/v1',
      kind: 'Lease',
      metadata: {
        ...(base?.metadata?.labels ? { labels: base.metadata.labels } : {}),
        ...(base?.metadata?.annotations ? { annotations: base.metadata.annotations } : {}),
        name,
        namespace,
        ...(lease.resourceVersion !== undefined ? { resourceVersion: lease.resourceVersion } : {}),
      },
      spec: {
        ...base?.spec,
        holderIdentity: lease.holderIdentity ?? '',
        ...(lease.leaseDurationSeconds !== undefined ? { leaseDurationSeconds: lease.leaseDurationSeconds } : {}),
        // Sent as strings: a Date would serialise with milliseconds, which MicroTime rejects.
        ...(lease.acquireTime !== undefined ? { acquireTime: lease.acquireTime as unknown as V1MicroTime } : {}),
        ...(lease.renewTime !== undefined ? { renewTime: lease.renewTime as unknown as V1MicroTime } : {}),
        ...(lease.leaseTransitions !== undefined ? { leaseTransitions: lease.leaseTransitions } : {}),
      },
    };
  };

  const fail = (what: string, err: unknown): Error => {
    let detail = err instanceof Error ? err.message : String(err);
    if (err instanceof ApiException) {
      // The Status message, not the whole response with its headers.
      let message = '';
      try {
        message = (JSON.parse(String(err.body)) as { message?: string }).message ?? '';
      } catch {
        // not a Status body
      }
      detail = `kube-apiserver answered ${err.code}${message ? `: ${message}` : ''}`;
    }
    return new Error(`${what} Lease ${namespace}/${name}: ${detail}`, { cause: err });
  };

  return {
    async get(signal) {
      try {
        return toLease(await api.readNamespacedLease({ name, namespace }, withSignal(signal)));
      } catch (err) {
        if (statusOf(err) === 404) {
          last = undefined;
          return undefined;
        }
        throw fail('reading', err);
      }
    },
    async create(lease, signal) {
      try {
        return toLease(await api.createNamespacedLease({ namespace, body: toV1(lease) }, withSignal(signal)));
      } catch (err) {
        if (statusOf(err) === 409) throw new LeaseConflictError(`Lease ${namespace}/${name} already exists`, { cause: err });
        throw fail('creating', err);
      }
    },
    async update(lease, signal) {
      try {
        return toLease(await api.replaceNamespacedLease({ name, namespace, body: toV1(lease) }, withSignal(signal)));
      } catch (err) {
        const code = statusOf(err);
        if (code === 409 || code === 404) throw new LeaseConflictError(`Lease ${namespace}/${name} changed (${code === 404 ? 'deleted' : 'conflict'})`, { cause: err });
        throw fail('updating', err);
      }
    },
  };
}
