/**
 * ClusterInputs from a kube-apiserver: informers (@kubernetes/client-node `ListWatch` + `Watch`)
 * on KMM Modules (`kmm.sigs.x-k8s.io/v1beta1`), Secrets and ConfigMaps in all namespaces.
 *
 * Ordering. Every informer callback only queues its work; one serial queue applies the changes to
 * the state and emits the events, so that the state and the events stay in the order of the
 * watches, and a listener always reads the state its event describes. The Module informer is
 * listed first; the Secret and ConfigMap informers start once the Modules are known, so their
 * first lists already know which objects are referenced. `synced` resolves when all three have
 * listed (after one `added` event per Module).
 *
 * Memory. Secret and ConfigMap data is kept only for the objects that a Module references (the
 * reverse index of inputs.ts): the data of every other object is removed from the informer's
 * cache as it arrives (the list is read in pages, and each page is stripped before the next one
 * is read), so unreferenced Secrets do not stay in memory. When a Module starts to reference an
 * existing object whose data was dropped, the object is read with one GET before the Module's
 * event is emitted. The informer caches keep the metadata of every object (names and
 * resourceVersions), which is what a relist compares.
 *
 * Restarts. `ListWatch` re-lists by itself after a 410 (an expired resourceVersion) and re-watches
 * after a watch ends or times out; an `error` (a failed list or watch, the server unreachable)
 * stops it, and this module restarts it after a delay with exponential backoff (1 s doubling to
 * 30 s by default, reset by a successful list or any watch event). A restart resumes the watch
 * from the last resourceVersion, so no change in between is lost; if that version is too old,
 * the server answers 410 and the informer lists again (deleted objects then get `deleted`).
 * After `relistAfterWatchFailures` failed watches in a row, the informer lists again anyway.
 *
 * Logs never hold Secret data: errors are logged as their HTTP status and the server's message.
 *
 * RBAC: list and watch on modules.kmm.sigs.x-k8s.io, secrets and configmaps in all namespaces,
 * and get on secrets and configmaps.
 */
import {
  CoreV1Api,
  CustomObjectsApi,
  ListWatch,
  Watch,
  type KubeConfig,
  type KubernetesListObject,
  type KubernetesObject,
} from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { MODULE_API_VERSION, moduleKey, parseModule, type KmmModule } from '../engine/module.ts';
import { describeKubeError, kubeStatusCode, withTimeout } from '../kube/errors.ts';
import {
  dockerConfigJsonOf,
  InputEvents,
  objectKey,
  ReferenceIndex,
  sameSecretData,
  sameStringData,
  type ClusterInputs,
  type DependencyKind,
  type DependencyRef,
  type InputsOptions,
  type ModuleChangeType,
} from './inputs.ts';

export const MODULE_GROUP = 'kmm.sigs.x-k8s.io';
export const MODULE_VERSION = 'v1beta1';
export const MODULE_PLURAL = 'modules';

export interface ClusterInputsOptions extends InputsOptions {
  /** First delay before restarting a failed informer; doubles up to `retryMaxMs`. Default 1 s. */
  readonly retryBaseMs?: number;
  /** Default 30 s. */
  readonly retryMaxMs?: number;
  /** Page size of the Secret and ConfigMap lists; default 500. */
  readonly listPageSize?: number;
  /** Timeout of a single GET of a Secret or ConfigMap; default 15 s. */
  readonly requestTimeoutMs?: number;
  /**
   * After this many failed watches in a row (no event, no successful list in between), list
   * again instead of resuming from the last resourceVersion; default 5.
   */
  readonly relistAfterWatchFailures?: number;
}

interface Meta {
  namespace?: string;
  name?: string;
  resourceVersion?: string;
}

interface DataObject extends KubernetesObject {
  data?: Record<string, string>;
  binaryData?: Record<string, string>;
}

type SecretData = Readonly<Record<string, Buffer>>;
type ConfigMapData = Readonly<Record<string, string>>;

interface Held<D> {
  readonly resourceVersion: string;
  readonly data: D;
}

/** Objects whose data was dropped while the list was read (not referenced then). */
const strippedAtList = new WeakSet<object>();



/**
 * Whether resourceVersion `a` is older than `b`. Resource versions are opaque to clients in general; here both
 * are versions of the same object from the same kube-apiserver (etcd revisions, decimal), which
 * is what this compares. Anything else is never "older".
 */
function isOlder(a: string, b: string): boolean {
  return /^\d+$/.test(a) && /^\d+$/.test(b) && BigInt(a) < BigInt(b);
}

/**
 * A Watch that can be closed for good (a request still connecting when the informer stops is
 * aborted once connected), that reports to its informer when a watch starts (right after a list
 * has been applied) and when an event arrives, and that turns the n-th failed watch in a row into
 * a 410 for ListWatch, which then lists again instead of resuming from a resourceVersion the
 * server may keep refusing (e.g. after an etcd restore).
 */
class InformerWatch extends Watch {
  #closed = false;
  #current: AbortController | undefined;
  #failures = 0;
  readonly #onStart: () => void;
  readonly #onEvent: () => void;
  readonly #relistAfter: number;
  readonly #onForcedRelist: (err: unknown) => void;

  constructor(kc: KubeConfig, o: { onStart: () => void; onEvent: () => void; relistAfter: number; onForcedRelist: (err: unknown) => void }) {
    super(kc);
    this.#onStart = o.onStart;
    this.#onEvent = o.onEvent;
    this.#relistAfter = o.relistAfter;
    this.#onForcedRelist = o.onForcedRelist;
  }

  /** A list succeeded: the failures in a row start again from zero. */
  resetFailures(): void {
    this.#failures = 0;
  }

  override async watch(
    path: string,
    queryParams: Record<string, string | number | boolean | undefined>,
    callback: (phase: string, apiObj: any, watchObj?: any) => void,
    done: (err: any) => void,
  ): Promise<AbortController> {
    if (this.#closed) {
      const c = new AbortController();
      c.abort();
      return c;
    }
    this.#onStart();
    let controller: AbortController;
    try {
      controller = await this.#watch(path, queryParams, callback, done);
    } catch (err) {
      // Before the request (no cluster, credentials that cannot be read): ListWatch would let
      // this escape as an unhandled rejection when it re-watches by itself; make it an error.
      const c = new AbortController();
      c.abort();
      setImmediate(() => done(err));
      return c;
    }
    if (this.#closed) controller.abort();
    else this.#current = controller;
    return controller;
  }

  #watch(
    path: string,
    queryParams: Record<string, string | number | boolean | undefined>,
    callback: (phase: string, apiObj: any, watchObj?: any) => void,
    done: (err: any) => void,
  ): Promise<AbortController> {
    return super.watch(
      path,
      queryParams,
      (phase, obj, raw) => {
        this.#failures = 0;
        this.#onEvent();
        callback(phase, obj, raw);
      },
      (err: unknown) => {
        const e = err as { name?: unknown } | null | undefined;
        // Not failures: a normal end, the client's inactivity timeout, a 410, or close().
        if (e && !this.#closed && e.name !== 'TimeoutError' && kubeStatusCode(e) !== 410 && ++this.#failures >= this.#relistAfter) {
          this.#failures = 0;
          this.#onForcedRelist(err);
          done(Object.assign(new Error('forced relist'), { statusCode: 410 }));
          return;
        }
        done(err);
      },
    );
  }

  close(): void {
    this.#closed = true;
    this.#current?.abort();
  }
}

interface Informer {
  readonly resource: string;
  listWatch: ListWatch<KubernetesObject>;
  watch: InformerWatch;
  /** A list has been applied since the last watch started. */
  listed: boolean;
  /** Failures since the last successful list or watch event. */
  attempts: number;
  retryTimer?: NodeJS.Timeout;
  restart(err: unknown): void;
}

export function createClusterInputs(kc: KubeConfig, logger: Logger, options: ClusterInputsOptions = {}): ClusterInputs {
  const log = logger.child({ component: 'cluster-inputs' });
  const retryBaseMs = options.retryBaseMs ?? 1000;
  const retryMaxMs = options.retryMaxMs ?? 30_000;
  const pageSize = options.listPageSize ?? 500;
  const requestTimeoutMs = options.requestTimeoutMs ?? 15_000;
  const relistAfterWatchFailures = Math.max(1, options.relistAfterWatchFailures ?? 5);
  const core = kc.makeApiClient(CoreV1Api);
  const custom = kc.makeApiClient(CustomObjectsApi);

  const events = new InputEvents(log);
  const index = new ReferenceIndex();
  const modules = new Map<string, KmmModule>();
  let moduleList: readonly KmmModule[] | undefined;
  const secrets = new Map<string, Held<SecretData>>();
  const configMaps = new Map<string, Held<ConfigMapData>>();
  let stopped = false;
  let isSynced = false;
  let dependenciesStarted = false;
  const retryTimers = new Set<NodeJS.Timeout>();
  let resolveSynced!: () => void;
  let rejectSynced!: (err: Error) => void;
  const synced = new Promise<void>((resolve, reject) => {
    resolveSynced = resolve;
    rejectSynced = reject;
  });
  // Rejected only by stop() before the first sync; awaiting it is optional.
  synced.catch(() => undefined);

  // --- the serial queue ------------------------------------------------------------------------
  let tail: Promise<void> = Promise.resolve();
  const enqueue = (what: string, task: () => void | Promise<void>) => {
    tail = tail
      .then(() => (stopped ? undefined : task()))
      .catch((err: unknown) => log.error({ task: what, error: describeKubeError(err) }, 'handling an input change failed'));
  };

  // --- informers -------------------------------------------------------------------------------
  const informers: Informer[] = [];
  const makeInformer = (resource: string, path: string, list: () => Promise<KubernetesListObject<KubernetesObject>>, onListed: () => void): Informer => {
    const informer = { resource, listed: false, attempts: 0 } as Informer;
    informer.watch = new InformerWatch(kc, {
      onStart: () => {
        // ListWatch opens the watch right after applying a list: the list's callbacks have run.
        if (informer.listed) {
          informer.listed = false;
          onListed();
        }
      },
      onEvent: () => {
        informer.attempts = 0;
      },
      relistAfter: relistAfterWatchFailures,
      onForcedRelist: (err) =>
        log.warn({ resource, error: describeKubeError(err), failures: relistAfterWatchFailures }, 'watch failed again; forcing a relist'),
    });
    const listAndNote = async () => {
      const result = await list();
      log.debug({ resource, items: result.items.length, resourceVersion: result.metadata?.resourceVersion }, 'listed');
      informer.watch.resetFailures();
      informer.attempts = 0;
      informer.listed = true;
      return result;
    };
    informer.listWatch = new ListWatch<KubernetesObject>(path, informer.watch, listAndNote, false);
    informer.restart = (err: unknown) => {
      if (stopped || informer.retryTimer) return;
      informer.attempts++;
      const base = Math.min(retryMaxMs, retryBaseMs * 2 ** Math.min(informer.attempts - 1, 20));
      const delay = Math.round(base * (0.8 + Math.random() * 0.4));
      const status = kubeStatusCode(err);
      log.warn(
        {
          resource,
          error: describeKubeError(err),
          retryInMs: delay,
          ...(status === 404 && resource === MODULE_PLURAL ? { hint: `is the ${MODULE_PLURAL}.${MODULE_GROUP} CRD installed?` } : {}),
        },
        'list or watch failed; restarting the informer',
      );
      const timer = setTimeout(() => {
        retryTimers.delete(timer);
        informer.retryTimer = undefined;
        startInformer(informer);
      }, delay);
      informer.retryTimer = timer;
      retryTimers.add(timer);
    };
    // ListWatch stops on an error (it restarts by itself only after a 410 or a watch's end).
    informer.listWatch.on('error', (err: unknown) => informer.restart(err));
    informers.push(informer);
    return informer;
  };
  const startInformer = (informer: Informer) => {
    if (stopped) return;
    informer.listWatch.start().catch((err: unknown) => informer.restart(err));
  };

  // --- Modules ---------------------------------------------------------------------------------
  const modulesInformer = makeInformer(
    'modules',
    `/apis/${MODULE_GROUP}/${MODULE_VERSION}/${MODULE_PLURAL}`,
    async () => (await custom.listClusterCustomObject({ group: MODULE_GROUP, version: MODULE_VERSION, plural: MODULE_PLURAL })) as KubernetesListObject<KubernetesObject>,
    () => {
      if (!dependenciesStarted) {
        dependenciesStarted = true;
        // Queued: the first list's Modules are in the reverse index before the other lists run.
        enqueue('start Secret and ConfigMap informers', () => {
          startInformer(secretsInformer);
          startInformer(configMapsInformer);
        });
      }
    },
  );

  const emitModule = (type: ModuleChangeType, module: KmmModule) => {
    moduleList = undefined;
    if (!isSynced || stopped) return;
    log.info({ module: moduleKey(module), change: type, resourceVersion: module.metadata.resourceVersion }, 'Module changed');
    events.module({ type, module });
  };

  const forget = (refs: readonly DependencyRef[]) => {
    for (const r of refs) (r.kind === 'Secret' ? secrets : configMaps).delete(r.key);
  };

  const onModule = async (obj: KubernetesObject) => {
    const meta = (obj.metadata ?? {}) as Meta;
    const key = objectKey(meta.namespace ?? '', meta.name ?? '');
    const previous = modules.get(key);
    const parsed = parseModule({ ...obj, apiVersion: obj.apiVersion ?? MODULE_API_VERSION });
    if (!parsed.ok) {
      log.warn({ module: key, errors: parsed.errors }, 'Module cannot be used; left out');
      try {
        options.onInvalid?.(key, parsed.errors);
      } catch (err) {
        log.error({ error: describeKubeError(err) }, 'onInvalid failed');
      }
      if (previous) {
        modules.delete(key);
        forget(index.delete(key));
        emitModule('deleted', previous);
      }
      return;
    }
    const module = parsed.module;
    const { added, removed } = index.set(module);
    forget(removed);
    // Objects newly referenced: read the ones whose data was dropped, before the event.
    for (const r of added) await ensureHeld(r, false);
    modules.set(key, module);
    emitModule(previous ? 'modified' : 'added', module);
  };

  const onModuleDeleted = (obj: KubernetesObject) => {
    const meta = (obj.metadata ?? {}) as Meta;
    const key = objectKey(meta.namespace ?? '', meta.name ?? '');
    const previous = modules.get(key);
    if (!previous) return;
    modules.delete(key);
    forget(index.delete(key));
    emitModule('deleted', previous);
  };

  modulesInformer.listWatch.on('add', (obj) => enqueue('Module', () => onModule(obj)));
  modulesInformer.listWatch.on('update', (obj) => enqueue('Module', () => onModule(obj)));
  modulesInformer.listWatch.on('delete', (obj) => enqueue('Module', () => onModuleDeleted(obj)));

  // --- Secrets and ConfigMaps ------------------------------------------------------------------
  const listed: Record<DependencyKind, boolean> = { Secret: false, ConfigMap: false };

  const pagedList = (kind: DependencyKind) => async (): Promise<KubernetesListObject<KubernetesObject>> => {
    const items: KubernetesObject[] = [];
    let cont: string | undefined;
    let resourceVersion: string | undefined;
    do {
      const page =
        kind === 'Secret'
          ? await core.listSecretForAllNamespaces({ limit: pageSize, ...(cont ? { _continue: cont } : {}) })
          : await core.listConfigMapForAllNamespaces({ limit: pageSize, ...(cont ? { _continue: cont } : {}) });
      for (const item of page.items as DataObject[]) {
        const meta = (item.metadata ?? {}) as Meta;
        if (!index.isReferenced(kind, objectKey(meta.namespace ?? '', meta.name ?? ''))) {
          delete item.data;
          delete item.binaryData;
          strippedAtList.add(item);
        }
        items.push(item);
      }
      cont = page.metadata?._continue || undefined;
      resourceVersion = page.metadata?.resourceVersion;
    } while (cont);
    return { metadata: { ...(resourceVersion ? { resourceVersion } : {}) }, items };
  };

  const decode = (kind: DependencyKind, raw: Record<string, string> | undefined): SecretData | ConfigMapData => {
    if (kind === 'ConfigMap') return { ...(raw ?? {}) };
    const out: Record<string, Buffer> = {};
    for (const [k, v] of Object.entries(raw ?? {})) out[k] = Buffer.from(v, 'base64');
    return out;
  };

  const emitDependency = (kind: DependencyKind, key: string) => {
    if (!isSynced || stopped) return;
    const users = index.modulesFor(kind, key);
    if (users.length === 0) return;
    const slash = key.indexOf('/');
    const change = { kind, namespace: key.slice(0, slash), name: key.slice(slash + 1), modules: users };
    log.info({ kind, object: key, modules: users }, 'referenced object changed');
    events.dependency(change);
  };

  const holder = (kind: DependencyKind) => (kind === 'Secret' ? secrets : configMaps) as Map<string, Held<SecretData | ConfigMapData>>;

  /**
   * Makes sure the data of a referenced object is held: reads it when its informer has listed,
   * knows the object, and its data was dropped. `announce`: emit a dependency event when data
   * arrives (the Modules were evaluated without it).
   */
  const ensureHeld = async (ref: DependencyRef, announce: boolean): Promise<void> => {
    const { kind, key } = ref;
    if (!listed[kind] || holder(kind).has(key)) return;
    const slash = key.indexOf('/');
    const namespace = key.slice(0, slash);
    const name = key.slice(slash + 1);
    const informer = kind === 'Secret' ? secretsInformer : configMapsInformer;
    if (informer.listWatch.get(name, namespace) === undefined) return; // does not exist
    let obj: DataObject;
    try {
      obj = (await withTimeout(
        kind === 'Secret' ? core.readNamespacedSecret({ name, namespace }) : core.readNamespacedConfigMap({ name, namespace }),
        requestTimeoutMs,
        `GET ${kind} ${key}`,
      )) as DataObject;
    } catch (err) {
      if (kubeStatusCode(err) === 404) return; // deleted meanwhile: its DELETED event follows
      const delay = Math.min(retryMaxMs, retryBaseMs * 4);
      log.warn({ kind, object: key, error: describeKubeError(err), retryInMs: delay }, 'cannot read a referenced object; retrying');
      const timer = setTimeout(() => {
        retryTimers.delete(timer);
        enqueue(`read ${kind}`, () => ensureHeld(ref, true));
      }, delay);
      retryTimers.add(timer);
      return;
    }
    if (!index.isReferenced(kind, key) || holder(kind).has(key)) return;
    holder(kind).set(key, { resourceVersion: (obj.metadata as Meta | undefined)?.resourceVersion ?? '', data: decode(kind, obj.data) });
    if (announce) emitDependency(kind, key);
  };

  const onDependency = async (kind: DependencyKind, meta: Meta, raw: Record<string, string> | undefined, stripped: boolean) => {
    const key = objectKey(meta.namespace ?? '', meta.name ?? '');
    if (!index.isReferenced(kind, key)) return;
    const held = holder(kind);
    const previous = held.get(key);
    if (stripped) {
      // Referenced since its list page was read: read it now.
      if (!previous) await ensureHeld({ kind, key }, true);
      return;
    }
    const rv = meta.resourceVersion ?? '';
    if (previous && (rv === previous.resourceVersion || isOlder(rv, previous.resourceVersion))) return;
    const data = decode(kind, raw);
    held.set(key, { resourceVersion: rv, data });
    const same =
      previous !== undefined &&
      (kind === 'Secret'
        ? sameSecretData(previous.data as SecretData, data as SecretData)
        : sameStringData(previous.data as ConfigMapData, data as ConfigMapData));
    if (!same) emitDependency(kind, key);
  };

  const onDependencyDeleted = (kind: DependencyKind, meta: Meta) => {
    const key = objectKey(meta.namespace ?? '', meta.name ?? '');
    if (holder(kind).delete(key)) emitDependency(kind, key);
  };

  const dependencyListed = (kind: DependencyKind) => () => {
    enqueue(`${kind} list applied`, () => {
      if (listed[kind]) return;
      listed[kind] = true;
      if (!isSynced && listed.Secret && listed.ConfigMap) {
        isSynced = true;
        moduleList = undefined;
        log.info({ modules: modules.size, referencedSecrets: secrets.size, referencedConfigMaps: configMaps.size }, 'inputs synced');
        for (const m of list()) events.module({ type: 'added', module: m });
        resolveSynced();
      }
    });
  };

  const secretsInformer = makeInformer('secrets', '/api/v1/secrets', pagedList('Secret'), dependencyListed('Secret'));
  const configMapsInformer = makeInformer('configmaps', '/api/v1/configmaps', pagedList('ConfigMap'), dependencyListed('ConfigMap'));

  for (const [kind, informer] of [['Secret', secretsInformer], ['ConfigMap', configMapsInformer]] as const) {
    const changed = (obj: KubernetesObject) => {
      // Take the data out of the informer's cache now; the queue decides whether to keep it.
      const o = obj as DataObject;
      const stripped = strippedAtList.has(o);
      const raw = o.data;
      delete o.data;
      delete o.binaryData;
      const meta = { ...((o.metadata ?? {}) as Meta) };
      enqueue(kind, () => onDependency(kind, meta, raw, stripped));
    };
    informer.listWatch.on('add', changed);
    informer.listWatch.on('update', changed);
    informer.listWatch.on('delete', (obj) => {
      const meta = { ...((obj.metadata ?? {}) as Meta) };
      enqueue(kind, () => onDependencyDeleted(kind, meta));
    });
  }

  const list = (): readonly KmmModule[] => {
    if (!moduleList) moduleList = [...modules.values()].sort((a, b) => (moduleKey(a) < moduleKey(b) ? -1 : 1));
    return moduleList;
  };

  startInformer(modulesInformer);

  return {
    modules: list,
    pullSecret: (namespace, name) => dockerConfigJsonOf(secrets.get(objectKey(namespace, name))?.data),
    secretData: (namespace, name) => secrets.get(objectKey(namespace, name))?.data,
    configMapData: (namespace, name) => configMaps.get(objectKey(namespace, name))?.data,
    synced,
    on: events.on.bind(events) as ClusterInputs['on'],
    async stop() {
      if (stopped) return;
      stopped = true;
      for (const t of retryTimers) clearTimeout(t);
      retryTimers.clear();
      for (const i of informers) {
        i.watch.close();
        await i.listWatch.stop();
      }
      await tail;
      if (!isSynced) rejectSynced(new Error('cluster inputs stopped before the first sync'));
    },
  };
}
