/**
 * What the upgrade gate decides from, kept in memory so that an AdmissionReview is answered in
 * microseconds: the PreflightValidationOCP objects (listed, then followed through a watch of this
 * server's own storage), the cluster's Modules (from the controller's inputs), and the digests of
 * release images named by tag (resolved in the background through the registry client).
 *
 * Until the first list and the first read of the Modules are done, the gate cannot judge: reading
 * it throws, so an upgrade asked for in that window is refused (fail closed) with that reason.
 */
import type { Logger } from 'pino';
import type { KubeObject } from '../api/resources.ts';
import { parseImageReference, withDefaultTag } from '../image/reference.ts';
import type { Platform, RegistryAccess, RegistryClient } from '../registry/types.ts';
import type { ResourceRegistry } from '../server/registry.ts';
import type { GateInputs, GateModule } from './release-verdict.ts';

export interface ModuleSource {
  /** Current Modules; may be called often. */
  modules(): readonly GateModule[];
  /** Resolves when the Modules have been read once. */
  readonly synced: Promise<void>;
  /** Called after every change of the Modules. */
  onChange(listener: () => void): void;
}

export interface GateStateOptions {
  readonly pfvo: ResourceRegistry;
  /** Absent: no Modules anywhere (stand-alone without --modules-dir). */
  readonly modules?: ModuleSource;
  readonly registry: RegistryClient;
  /** How to reach a registry host (plain HTTP for --insecure-registries). */
  readonly accessFor: (registryHost: string) => RegistryAccess;
  readonly platform: Platform;
  readonly logger: Logger;
  /** A tag's digest is looked up again after this long (default 5 min); a failure after 10 s. */
  readonly digestTtlMs?: number;
  readonly now?: () => number;
}

export interface GateState extends GateInputs {
  /** Lists the objects and starts following them; resolves once the gate can judge. */
  start(): Promise<void>;
  stop(): Promise<void>;
  readonly ready: boolean;
}

const NO_MODULES: readonly GateModule[] = Object.freeze([]);

export function createGateState(o: GateStateOptions): GateState {
  const log = o.logger.child({ component: 'upgrade-gate' });
  const now = o.now ?? Date.now;
  const ttl = o.digestTtlMs ?? 5 * 60_000;
  const abort = new AbortController();
  const objects = new Map<string, KubeObject>();
  let validations: readonly KubeObject[] | undefined;
  let listed = false;
  let modulesRead = o.modules === undefined;
  let modules: readonly GateModule[] | undefined;
  const digests = new Map<string, { digest?: string; until: number }>();
  const resolving = new Set<string>();
  let following: Promise<void> | undefined;

  o.modules?.onChange(() => {
    modules = undefined;
  });

  const resolve = (image: string) => {
    if (resolving.has(image) || abort.signal.aborted) return;
    let ref;
    try {
      ref = withDefaultTag(parseImageReference(image));
    } catch {
      return; // the verdict reports an invalid reference itself
    }
    resolving.add(image);
    o.registry
      .resolveImage(ref, o.accessFor(ref.domain), o.platform, { signal: abort.signal })
      .then(
        (r) => {
          // A release is named by its index digest when it is multi-architecture.
          digests.set(image, { digest: r.indexDigest ?? r.digest, until: now() + ttl });
          log.debug({ image, digest: r.indexDigest ?? r.digest }, 'release tag resolved');
        },
        (err: unknown) => {
          digests.set(image, { until: now() + 10_000 });
          if (!abort.signal.aborted) log.info({ image, error: (err as Error).message }, 'could not resolve a release tag to its digest; trying again later');
        },
      )
      .finally(() => resolving.delete(image));
  };

  const note = (obj: KubeObject) => {
    objects.set(obj.metadata.name!, obj);
    validations = undefined;
    const image = (obj.spec as { releaseImage?: unknown } | undefined)?.releaseImage;
    if (typeof image === 'string' && !image.includes('@')) resolve(image);
  };

  const follow = async (fromRevision: string) => {
    let rv = fromRevision;
    while (!abort.signal.aborted) {
      try {
        const events = await o.pfvo.watch({ resourceVersion: rv }, abort.signal);
        for await (const ev of events) {
          if (ev.type === 'ADDED' || ev.type === 'MODIFIED') {
            note(ev.decoded.obj);
            rv = ev.decoded.obj.metadata.resourceVersion ?? rv;
          } else if (ev.type === 'DELETED') {
            objects.delete(ev.decoded.obj.metadata.name!);
            validations = undefined;
            rv = ev.decoded.obj.metadata.resourceVersion ?? rv;
          } else if (ev.type === 'ERROR') {
            // Too old a resourceVersion (410): list again.
            rv = await relist();
            break;
          }
        }
      } catch (err) {
        if (abort.signal.aborted) return;
        log.warn({ error: (err as Error).message }, 'watch of PreflightValidationOCP objects failed; listing again');
        await new Promise((r) => setTimeout(r, 1000));
        rv = await relist().catch(() => rv);
      }
    }
  };

  const relist = async (): Promise<string> => {
    const list = await o.pfvo.list({});
    objects.clear();
    for (const d of list.items) note(d.obj);
    validations = undefined;
    listed = true;
    return list.resourceVersion;
  };

  return {
    async start() {
      const rv = await relist();
      following = follow(rv);
      if (o.modules) {
        await Promise.race([o.modules.synced, new Promise<void>((r) => abort.signal.addEventListener('abort', () => r(), { once: true }))]);
        modulesRead = true;
      }
      log.info({ validations: objects.size }, 'upgrade gate ready');
    },
    async stop() {
      abort.abort();
      await following;
    },
    get ready() {
      return listed && modulesRead;
    },
    validations() {
      if (!listed) throw new Error('the PreflightValidationOCP objects have not been read yet (the server is starting)');
      return (validations ??= [...objects.values()]);
    },
    modules() {
      if (!o.modules) return NO_MODULES;
      if (!modulesRead) throw new Error('the cluster\'s Modules have not been read yet (the server is starting)');
      return (modules ??= o.modules.modules());
    },
    digestOf(image) {
      const known = digests.get(image);
      if (!known || known.until < now()) resolve(image);
      return known?.digest;
    },
  };
}
