/**
 * The preflight controller: for every PreflightValidation and PreflightValidationOCP, validate
 * every Module of the cluster for the object's kernel, in parallel, and keep the object's status
 * true. Work is keyed by (object, Module) in a de-duplicating queue with per-key serialisation;
 * status changes are coalesced per object and written through the status subresource, once per
 * flush, only when something really changed.
 */
import type { Logger } from 'pino';
import type { KubeObject } from '../api/resources.ts';
import type { ModuleStatus, PreflightValidationStatus } from '../api/schema.ts';
import { moduleKey, type KmmModule } from '../engine/module.ts';
import { registryFileReader } from '../engine/image-files.ts';
import { resolveReleaseKernel } from '../engine/ocp-release.ts';
import type { Builder } from '../build/types.ts';
import type { SignStage } from '../engine/sign-stage.ts';
import type { SignHashAlgorithm } from '../sign/module-signature.ts';
import type { ImageStage } from '../engine/types.ts';
import { validateModuleForKernel, type BuildSignDeps, type ModuleVerdict } from '../engine/validate.ts';
import { parseDockerConfigJson } from '../registry/docker-config.ts';
import type { DockerConfig, Platform, RegistryClient } from '../registry/types.ts';
import { ApiError } from '../server/errors.ts';
import type { RequestContext, ResourceRegistry } from '../server/registry.ts';
import type { ClusterInputs } from './inputs.ts';
import type { ControllerMetrics } from './metrics.ts';
import { nextEntry, summarize, type EntryUpdate } from './status.ts';
import { WorkQueue } from './work-queue.ts';
import { createWorkerPool, type HandlerOutcome, type WorkerPool } from './worker-pool.ts';

/** Kubernetes Events on the validation objects, one per Module transition. */
export interface EventRecorder {
  record(object: KubeObject, type: 'Normal' | 'Warning', reason: string, message: string): void;
}

export interface ControllerOptions {
  readonly pfv: ResourceRegistry;
  readonly pfvo: ResourceRegistry;
  readonly inputs: ClusterInputs;
  readonly imageStage: ImageStage;
  readonly registryClient: RegistryClient;
  /** Target platform of the nodes (architecture), never this process's CPU by default. */
  readonly platform: Platform;
  /** The platform a Module is validated for, when it depends on the Module (its arch selector). */
  readonly platformFor?: (module: KmmModule) => Platform;
  readonly logger: Logger;
  readonly concurrency?: number;
  readonly events?: EventRecorder;
  readonly flushIntervalMs?: number;
  readonly now?: () => Date;
  /** Registries (host[:port]) whose release and driver-toolkit images are read over plain HTTP. */
  readonly insecureRegistries?: readonly string[];
  /** Metrics, created once per process (a new term of leadership creates a new controller). */
  readonly metrics?: ControllerMetrics;
  /** The Sign stage; without it a Module that needs signing is False, saying so. */
  readonly signStage?: SignStage;
  /** The Build stage's builder (Jobs in a cluster, buildah here); without it builds are unavailable. */
  readonly builder?: Builder;
  /** Why there is no builder, for the Modules' reasons. */
  readonly noBuilderReason?: string;
  /** Hash algorithm of module signatures (default sha256). */
  readonly signHashAlgorithm?: SignHashAlgorithm;
  /** How often a running build is looked at again (default 10 s). */
  readonly buildPollMs?: number;
}

interface ObjectState {
  readonly kind: 'pfv' | 'pfvo';
  readonly name: string;
  generation: number;
  object: KubeObject;
  kernel?: string;
  kernelProblem?: { reason: string; message: string; retrying: boolean };
  /** Desired entry per Module key (`namespace/name`). */
  readonly entries: Map<string, EntryUpdate>;
  /** Fingerprint of the Module inputs a False verdict was made with. */
  readonly fingerprints: Map<string, string>;
  dirty: boolean;
  /** Clean-ups of finished builds, run once their verdicts are written. */
  readonly releases: Map<string, () => Promise<void>>;
  kernelRetry?: NodeJS.Timeout;
  kernelAttempts: number;
}

const WAITING: EntryUpdate = { verificationStatus: 'Unknown', verificationStage: 'Image', statusReason: 'waiting to be validated' };
const SEP = '|';

function entryOf(v: ModuleVerdict): EntryUpdate {
  if (v.status === 'True') return { verificationStatus: 'True', verificationStage: 'Done', statusReason: v.reason };
  if (v.status === 'Unknown') return { verificationStatus: 'Unknown', verificationStage: v.stage === 'Sign' ? 'Sign' : 'Build', statusReason: v.reason };
  return { verificationStatus: v.status, verificationStage: 'Requeued', statusReason: v.reason };
}

function fingerprint(m: KmmModule, inputs: ClusterInputs): string {
  const secret = m.spec.imageRepoSecret?.name;
  const pull = secret ? inputs.pullSecret(m.metadata.namespace ?? '', secret) ?? '' : '';
  return JSON.stringify([m.spec, pull.length, hash(pull)]);
}

function hash(s: string): number {
  let h = 0;
  for (let i = 0; i < s.length; i++) h = (Math.imul(h, 31) + s.charCodeAt(i)) | 0;
  return h;
}

export interface PreflightController {
  start(): Promise<void>;
  stop(): Promise<void>;
  readonly stats: { readonly objects: number; readonly queued: number; readonly running: number; readonly statusWrites: number };
}

export function createPreflightController(o: ControllerOptions): PreflightController {
  const log = o.logger.child({ component: 'controller' });
  const now = o.now ?? (() => new Date());
  const states = new Map<string, ObjectState>();
  const queue = new WorkQueue<string>();
  const abort = new AbortController();
  let statusWrites = 0;
  const ctx: RequestContext = {
    user: { username: 'system:kmm-preflight:controller', groups: ['system:masters'] },
    dryRun: false,
    fieldManager: 'kmm-preflight-controller',
    fieldValidation: 'Ignore',
    warnings: [],
  };
  const registryOf = (kind: 'pfv' | 'pfvo') => (kind === 'pfv' ? o.pfv : o.pfvo);
  const stateKey = (kind: string, name: string) => `${kind}/${name}`;

  const credentialsFor = async (m: KmmModule): Promise<DockerConfig | undefined> => {
    const secret = m.spec.imageRepoSecret?.name;
    if (!secret) return undefined;
    const text = o.inputs.pullSecret(m.metadata.namespace ?? '', secret);
    if (text === undefined) throw new Error(`imageRepoSecret ${m.metadata.namespace}/${secret} does not exist or is not a kubernetes.io/dockerconfigjson Secret`);
    return parseDockerConfigJson(text);
  };

  // Rebuilt only when the Modules change: every work item looks its Module up here.
  let modulesCache: Map<string, KmmModule> | undefined;
  const modulesByKey = () => (modulesCache ??= new Map(o.inputs.modules().map((m) => [moduleKey(m), m] as const)));

  /** Brings an object's entries in line with the cluster's Modules and queues the work due. */
  const sync = (s: ObjectState) => {
    const modules = modulesByKey();
    for (const k of [...s.entries.keys()]) {
      if (!modules.has(k)) {
        s.entries.delete(k);
        s.fingerprints.delete(k);
        pool.cancel(`${stateKey(s.kind, s.name)}${SEP}${k}`);
        const release = s.releases.get(k);
        s.releases.delete(k);
        void release?.().catch((err: unknown) => log.warn({ object: s.name, module: k, error: (err as Error).message }, 'could not clean up after a build'));
        s.dirty = true;
      }
    }
    if (!s.kernel) return;
    for (const [k, m] of modules) {
      let e = s.entries.get(k);
      if (!e) {
        s.entries.set(k, (e = WAITING));
        s.dirty = true;
      }
      const due =
        e.verificationStatus === 'Unknown' ||
        (e.verificationStatus === 'False' && s.fingerprints.get(k) !== fingerprint(m, o.inputs));
      if (due) queue.add(`${stateKey(s.kind, s.name)}${SEP}${k}`);
    }
  };

  const resolveKernel = async (s: ObjectState) => {
    const spec = (s.object.spec ?? {}) as Record<string, unknown>;
    if (s.kind === 'pfv') {
      s.kernel = String(spec['kernelVersion']);
      return;
    }
    const release = String(spec['releaseImage']);
    const insecure = new Set(o.insecureRegistries ?? []);
    const reader = registryFileReader(o.registryClient, (host) => ({ insecure: insecure.has(host) }), o.platform);
    const r = await resolveReleaseKernel(release, spec['useRTKernel'] === true, reader, abort.signal);
    if (r.ok) {
      s.kernel = r.kernel;
      s.kernelProblem = undefined;
      log.info({ object: s.name, release, kernel: r.kernel }, 'release kernel resolved');
    } else {
      s.kernelProblem = { reason: r.code, message: r.reason, retrying: r.retriable };
      if (r.retriable) {
        const delay = Math.min(300_000, 1000 * 2 ** Math.min(s.kernelAttempts++, 8));
        s.kernelRetry = setTimeout(() => void resolveKernel(s).then(() => sync(s)), delay);
        s.kernelRetry.unref();
      }
    }
    s.dirty = true;
  };

  const reset = async (kind: 'pfv' | 'pfvo', obj: KubeObject) => {
    const name = obj.metadata.name!;
    const previous = states.get(stateKey(kind, name));
    if (previous) drop(previous);
    const generation = obj.metadata.generation ?? 1;
    const s: ObjectState = { kind, name, generation, object: obj, entries: new Map(), fingerprints: new Map(), releases: new Map(), dirty: true, kernelAttempts: 0 };
    // A restart continues from the stored statuses of the same generation.
    const status = obj.status;
    if (status?.observedGeneration === generation) {
      for (const m of status.modules ?? []) {
        const k = `${m.namespace}/${m.name}`;
        const keep = m.verificationStatus === 'True' || m.verificationStatus === 'False';
        s.entries.set(k, keep ? { verificationStatus: m.verificationStatus, verificationStage: m.verificationStage, statusReason: m.statusReason ?? '' } : WAITING);
      }
      if (kind === 'pfvo' && status.kernelVersion) s.kernel = status.kernelVersion;
    }
    states.set(stateKey(kind, name), s);
    if (!s.kernel) await resolveKernel(s);
    sync(s);
  };

  const drop = (s: ObjectState) => {
    if (s.kernelRetry) clearTimeout(s.kernelRetry);
    for (const k of s.entries.keys()) pool.cancel(`${stateKey(s.kind, s.name)}${SEP}${k}`);
    states.delete(stateKey(s.kind, s.name));
  };

  const handler = async (key: string, signal: AbortSignal): Promise<HandlerOutcome> => {
    const [sk, mk] = key.split(SEP) as [string, string];
    const s = states.get(sk);
    const module = modulesByKey().get(mk);
    if (!s || !module || !s.kernel) return 'done';
    const generation = s.generation;
    const fp = fingerprint(module, o.inputs);
    const started = performance.now();
    const platform = o.platformFor?.(module) ?? o.platform;
    const verdict = await validateModuleForKernel(module, s.kernel, { imageStage: o.imageStage, platform, credentialsFor, ...buildSignFor(s, key) }, signal);
    metrics?.stageDuration.observe({ stage: verdict.stage }, (performance.now() - started) / 1000);
    metrics?.outcomes.inc({ status: verdict.status, code: verdict.code });
    if (signal.aborted || states.get(sk) !== s || s.generation !== generation) return 'done';
    log.debug({ object: s.name, module: mk, stage: verdict.stage, status: verdict.status, ms: Math.round(performance.now() - started) }, 'module validated');
    const before = s.entries.get(mk);
    const after = entryOf(verdict);
    s.entries.set(mk, after);
    s.fingerprints.set(mk, fp);
    if (verdict.release) s.releases.set(mk, verdict.release);
    s.dirty = true;
    if (verdict.status === 'Unknown') return { after: o.buildPollMs ?? 10_000 };
    if (!before || before.verificationStatus !== after.verificationStatus) {
      o.events?.record(
        s.object,
        after.verificationStatus === 'True' ? 'Normal' : 'Warning',
        after.verificationStatus === 'True' ? 'ModuleVerified' : after.verificationStatus === 'False' ? 'ModuleFailed' : 'ModuleError',
        `Module ${mk}: ${after.statusReason}`,
      );
    }
    return verdict.status === 'Error' ? 'retry' : 'done';
  };

  const buildSignFor = (s: ObjectState, key: string): { buildSign?: BuildSignDeps } => {
    if (!o.signStage) return {};
    const spec = (s.object.spec ?? {}) as Record<string, unknown>;
    return {
      buildSign: {
        key,
        owner: { apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: s.kind === 'pfv' ? 'PreflightValidation' : 'PreflightValidationOCP', name: s.name, uid: s.object.metadata.uid ?? '' },
        push: spec['pushBuiltImage'] === true,
        ...(o.builder ? { builder: o.builder } : {}),
        ...(o.noBuilderReason ? { noBuilderReason: o.noBuilderReason } : {}),
        signStage: o.signStage,
        ...(o.signHashAlgorithm ? { signHashAlgorithm: o.signHashAlgorithm } : {}),
        configMapData: (ns, name) => o.inputs.configMapData(ns, name),
        secretData: (ns, name) => o.inputs.secretData(ns, name),
        pullSecretText: (m) => (m.spec.imageRepoSecret?.name ? o.inputs.pullSecret(m.metadata.namespace ?? '', m.spec.imageRepoSecret.name) : undefined),
      },
    };
  };
  o.builder?.onUpdate((key) => queue.add(key));

  /** Runs the clean-ups of builds whose verdicts are now written. */
  const runReleases = (s: ObjectState) => {
    for (const [k, release] of s.releases) {
      s.releases.delete(k);
      release().catch((err: unknown) => log.warn({ object: s.name, module: k, error: (err as Error).message }, 'could not clean up after a build'));
    }
  };

  const pool: WorkerPool = createWorkerPool({ queue, concurrency: o.concurrency ?? 16, handler, logger: log });
  const metrics = o.metrics;

  /** Writes the dirty objects' statuses, one write per object, only when something changed. */
  const flush = async () => {
    for (const s of [...states.values()]) {
      if (!s.dirty) continue;
      s.dirty = false;
      const registry = registryOf(s.kind);
      try {
        const current = await registry.get(s.name);
        if ((current.obj.metadata.generation ?? 1) !== s.generation) continue;
        const prev: PreflightValidationStatus | undefined = current.obj.status;
        const prevEntries = new Map<string, ModuleStatus>((prev?.modules ?? []).map((m) => [`${m.namespace}/${m.name}`, m]));
        const t = now();
        const modules: ModuleStatus[] = [...s.entries.keys()].sort().map((k) => {
          const [namespace, name] = k.split('/') as [string, string];
          return nextEntry(prevEntries.get(k), { namespace, name }, s.entries.get(k)!, t);
        });
        const status = summarize(prev, { modules, generation: s.generation, ...(s.kernel ? { kernelVersion: s.kernel } : {}), ...(s.kernelProblem ? { kernelProblem: s.kernelProblem } : {}) }, t);
        if (JSON.stringify(status) !== JSON.stringify(prev)) {
          await registry.update(s.name, { ...current.obj, status }, ctx, 'status');
          statusWrites++;
          metrics?.statusWrites.inc();
        }
        runReleases(s);
      } catch (err) {
        if (err instanceof ApiError && err.reason === 'NotFound') continue;
        s.dirty = true;
        log.warn({ object: s.name, error: (err as Error).message }, 'status write failed; retrying');
      }
    }
  };

  let flushTimer: NodeJS.Timeout | undefined;
  let stopping: Promise<void> | undefined;
  let flushing: Promise<void> = Promise.resolve();
  const watchers: Promise<void>[] = [];

  const watchKind = async (kind: 'pfv' | 'pfvo') => {
    const registry = registryOf(kind);
    while (!abort.signal.aborted) {
      try {
        const events = await registry.watch({}, abort.signal);
        for await (const ev of events) {
          if (ev.type === 'ADDED' || ev.type === 'MODIFIED') {
            const obj = ev.decoded.obj;
            const s = states.get(stateKey(kind, obj.metadata.name!));
            if (obj.metadata.deletionTimestamp) {
              if (s) drop(s);
            } else if (!s || (obj.metadata.generation ?? 1) !== s.generation) await reset(kind, obj);
            else s.object = obj;
          } else if (ev.type === 'DELETED') {
            const s = states.get(stateKey(kind, ev.decoded.obj.metadata.name!));
            if (s) drop(s);
          } else if (ev.type === 'ERROR') {
            log.warn({ kind, error: ev.error.message }, 'watch of validation objects ended; watching again');
            break;
          }
        }
      } catch (err) {
        if (abort.signal.aborted) return;
        log.warn({ kind, error: (err as Error).message }, 'watch of validation objects failed; retrying');
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  };

  o.inputs.on('module', (change) => {
    modulesCache = undefined;
    for (const s of states.values()) {
      if (change.type === 'modified') {
        const k = moduleKey(change.module);
        const e = s.entries.get(k);
        // A changed Module is validated again unless it is already verified in this object.
        if (e && e.verificationStatus !== 'True') s.fingerprints.delete(k);
      }
      sync(s);
    }
  });
  o.inputs.on('dependency', (change) => {
    for (const s of states.values()) {
      for (const k of change.modules) {
        const e = s.entries.get(k);
        if (e && e.verificationStatus === 'False') s.fingerprints.delete(k);
      }
      sync(s);
    }
  });

  return {
    async start() {
      // Stopping while the inputs are still being listed must not hang.
      await Promise.race([o.inputs.synced, new Promise<void>((r) => abort.signal.addEventListener('abort', () => r(), { once: true }))]);
      if (abort.signal.aborted) return;
      pool.start();
      watchers.push(watchKind('pfv'), watchKind('pfvo'));
      const tick = () => {
        flushing = flush().finally(() => {
          if (!abort.signal.aborted) flushTimer = setTimeout(tick, o.flushIntervalMs ?? 250);
        });
      };
      tick();
      log.info({ concurrency: o.concurrency ?? 16, platform: o.platform }, 'preflight controller started');
    },
    stop() {
      stopping ??= stopOnce();
      return stopping;
    },
    get stats() {
      return { objects: states.size, queued: pool.queued, running: pool.running, statusWrites };
    },
  };

  /** Graceful: running validations finish (bounded), the last changes are written. */
  async function stopOnce(): Promise<void> {
    abort.abort();
    if (flushTimer) clearTimeout(flushTimer);
    for (const s of [...states.values()]) if (s.kernelRetry) clearTimeout(s.kernelRetry);
    await pool.close({ timeoutMs: 10_000 });
    await flushing;
    await flush();
    await Promise.allSettled(watchers);
    queue.shutDown();
  }
}
