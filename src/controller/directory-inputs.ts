/**
 * ClusterInputs for the stand-alone mode: Modules, Secrets (pull secrets and others) and
 * ConfigMaps read from manifest files and directories (src/check/manifests.ts), read again on
 * change, with the same events as the cluster implementation (see inputs.ts).
 *
 * - Change detection: `fs.watch` on every directory read (and on the directory of a path that is a
 *   file), debounced (200 ms by default), plus a slow poll (every 10 s by default) because
 *   `fs.watch` misses events on some file systems (network and overlay file systems, some
 *   container volume mounts). Reads never overlap: a change during a read leads to one more read.
 * - Errors keep the previous state, file by file: a file that cannot be read or parsed, or that
 *   holds a Module that does not parse, keeps contributing what it held at its last good read
 *   (nothing if it never read well); the error is logged once per distinct content, and invalid
 *   Modules are reported through `onInvalid`. A deleted file is a deletion, not an error.
 * - Objects without a namespace are in `default` (like `kubectl apply -f` without a namespace).
 *   A Module defined twice: the first in path order wins, the other is logged.
 * - Every Secret's data is kept here (they are local files already).
 */
import { statSync, watch as fsWatch, type FSWatcher } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { dirname, sep } from 'node:path';
import type { Logger } from 'pino';
import {
  DEFAULT_MANIFEST_NAMESPACE,
  InputError,
  listManifestFiles,
  parseManifestDocuments,
  readManifestObject,
  type ManifestObject,
} from '../check/manifests.ts';
import { moduleKey, type KmmModule } from '../engine/module.ts';
import {
  canonicalJson,
  dockerConfigJsonOf,
  InputEvents,
  objectKey,
  ReferenceIndex,
  sameSecretData,
  sameStringData,
  type ClusterInputs,
  type DependencyChange,
  type InputsOptions,
  type ModuleChange,
} from './inputs.ts';

export interface DirectoryInputsOptions extends InputsOptions {
  /** Quiet time after a file system event before reading again; default 200 ms. */
  readonly debounceMs?: number;
  /** Interval of the fallback poll; default 10 s; 0 disables it. */
  readonly pollIntervalMs?: number;
  /** `false` disables `fs.watch` (the poll alone then sees changes). Default true. */
  readonly watch?: boolean;
  /** Namespace of the objects that name none; default `default`. */
  readonly defaultNamespace?: string;
}

type Valid = Extract<ManifestObject, { kind: 'Module' | 'Secret' | 'ConfigMap' }>;

interface FileState {
  /** The text of the last good read. */
  readonly text: string;
  readonly objects: readonly Valid[];
}

interface SecretEntry {
  readonly type: string;
  readonly data: Readonly<Record<string, Buffer>>;
}

interface Snapshot {
  readonly modules: ReadonlyMap<string, KmmModule>;
  readonly secrets: ReadonlyMap<string, SecretEntry>;
  readonly configMaps: ReadonlyMap<string, Readonly<Record<string, string>>>;
}

const EMPTY: Snapshot = { modules: new Map(), secrets: new Map(), configMaps: new Map() };

/**
 * Watches `paths` (manifest files or directories). Throws InputError at once when a path does not
 * exist; a path that disappears later keeps its last state (and is logged).
 */
export function createDirectoryInputs(paths: readonly string[], logger: Logger, options: DirectoryInputsOptions = {}): ClusterInputs {
  const log = logger.child({ component: 'directory-inputs' });
  const debounceMs = options.debounceMs ?? 200;
  const pollIntervalMs = options.pollIntervalMs ?? 10_000;
  const defaultNamespace = options.defaultNamespace ?? DEFAULT_MANIFEST_NAMESPACE;
  for (const p of paths) {
    try {
      statSync(p);
    } catch {
      throw new InputError(`${p}: no such file or directory`);
    }
  }

  const events = new InputEvents(log);
  const index = new ReferenceIndex();
  let files = new Map<string, FileState>();
  /** Per file or path: the last error logged, so a poll does not log it again. */
  const reported = new Map<string, string>();
  /** Per file: the text that failed last, so an unchanged bad file is not parsed again. */
  const failedText = new Map<string, string>();
  let reportedDuplicates = new Set<string>();
  let state: Snapshot = EMPTY;
  let moduleList: readonly KmmModule[] = [];
  let stopped = false;
  let isSynced = false;
  let resolveSynced!: () => void;
  let rejectSynced!: (err: Error) => void;
  const synced = new Promise<void>((resolve, reject) => {
    resolveSynced = resolve;
    rejectSynced = reject;
  });
  // Rejected only by stop() before the first read; awaiting it is optional.
  synced.catch(() => undefined);
  const watchers = new Map<string, FSWatcher>();
  let debounceTimer: NodeJS.Timeout | undefined;
  let running: Promise<void> | undefined;
  let again = false;

  const report = (where: string, message: string) => {
    if (reported.get(where) === message) return;
    reported.set(where, message);
    log.error({ path: where, error: message }, 'manifest error; keeping the previous state of this file');
  };
  const clearReport = (where: string) => {
    if (reported.delete(where)) log.info({ path: where }, 'manifest readable again');
  };

  /** The usable objects of a file, or every problem in it. */
  const parseFile = (text: string, file: string): { ok: true; objects: Valid[] } | { ok: false; errors: string[] } => {
    let docs: unknown[];
    try {
      docs = parseManifestDocuments(text, file);
    } catch (err) {
      // The first line only: the parser's code frame after it could show a line of a Secret.
      return { ok: false, errors: [(err as Error).message.split('\n')[0]!.replace(/:$/, '')] };
    }
    const objects: Valid[] = [];
    const errors: string[] = [];
    docs.forEach((doc, i) => {
      const obj = readManifestObject(doc, { defaultNamespace });
      if (obj.kind === 'ignored') return;
      if (obj.kind === 'invalid') {
        errors.push(...obj.errors.map((e) => `document ${i + 1}: ${obj.objectKind}${obj.key ? ` ${obj.key}` : ''}: ${e}`));
        if (obj.objectKind === 'Module') {
          try {
            options.onInvalid?.(obj.key ?? '', obj.errors);
          } catch (err) {
            log.error({ err }, 'onInvalid failed');
          }
        }
        return;
      }
      objects.push(obj);
    });
    return errors.length > 0 ? { ok: false, errors } : { ok: true, objects };
  };

  const readAll = async (): Promise<{ files: Map<string, FileState>; directories: Set<string> }> => {
    const next = new Map<string, FileState>();
    const directories = new Set<string>();
    const listed = new Set<string>();
    for (const root of paths) {
      let listing;
      try {
        listing = await listManifestFiles(root);
        clearReport(root);
      } catch (err) {
        report(root, (err as Error).message);
        // Keep what the path held; watch its parent to see it come back.
        for (const [f, s] of files) if (f === root || f.startsWith(root.endsWith(sep) ? root : root + sep)) next.set(f, s);
        directories.add(dirname(root));
        continue;
      }
      for (const d of listing.directories) directories.add(d);
      // A file path: watch its directory, which also sees a replacement by rename.
      if (listing.directories.length === 0) directories.add(dirname(root));
      for (const file of listing.files) {
        if (listed.has(file)) continue;
        listed.add(file);
        const previous = files.get(file);
        let text: string;
        try {
          text = await readFile(file, 'utf8');
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue; // deleted since listed
          report(file, (err as Error).message);
          if (previous) next.set(file, previous);
          continue;
        }
        if (previous && previous.text === text) {
          next.set(file, previous);
          continue;
        }
        if (failedText.get(file) === text) {
          if (previous) next.set(file, previous);
          continue;
        }
        const parsed = parseFile(text, file);
        if (parsed.ok) {
          failedText.delete(file);
          clearReport(file);
          next.set(file, { text, objects: parsed.objects });
        } else {
          failedText.set(file, text);
          report(file, parsed.errors.join('; '));
          if (previous) next.set(file, previous);
        }
      }
    }
    // Forget the bookkeeping of files that are gone (a root that could not be listed keeps its own).
    for (const f of [...failedText.keys()]) if (!listed.has(f)) failedText.delete(f);
    for (const f of [...reported.keys()]) if (!listed.has(f) && !paths.includes(f)) reported.delete(f);
    return { files: next, directories };
  };

  const merge = (all: ReadonlyMap<string, FileState>): Snapshot => {
    const modules = new Map<string, KmmModule>();
    const secrets = new Map<string, SecretEntry>();
    const configMaps = new Map<string, Readonly<Record<string, string>>>();
    const where = new Map<string, string>();
    const duplicates = new Set<string>();
    for (const [file, s] of all) {
      for (const o of s.objects) {
        const map: Map<string, unknown> = o.kind === 'Module' ? modules : o.kind === 'Secret' ? secrets : configMaps;
        const id = `${o.kind} ${o.key}`;
        if (map.has(o.key)) {
          const message = `${file}: ${id} is also defined in ${where.get(id)}; that one is used`;
          duplicates.add(message);
          if (!reportedDuplicates.has(message)) log.warn({ path: file, object: id }, message);
          continue;
        }
        where.set(id, file);
        if (o.kind === 'Module') modules.set(o.key, o.module);
        else if (o.kind === 'Secret') secrets.set(o.key, { type: o.type, data: o.data });
        else configMaps.set(o.key, o.data);
      }
    }
    reportedDuplicates = duplicates;
    return { modules, secrets, configMaps };
  };

  const syncWatchers = (directories: ReadonlySet<string>) => {
    if (options.watch === false || stopped) return;
    for (const [d, w] of watchers) {
      if (!directories.has(d)) {
        w.close();
        watchers.delete(d);
      }
    }
    for (const d of directories) {
      if (watchers.has(d)) continue;
      try {
        const w = fsWatch(d, () => schedule());
        w.on('error', (err) => {
          log.debug({ directory: d, error: err.message }, 'directory watch ended');
          w.close();
          if (watchers.get(d) === w) watchers.delete(d);
          schedule();
        });
        watchers.set(d, w);
      } catch (err) {
        // Not fatal: the poll still sees changes.
        log.debug({ directory: d, error: (err as Error).message }, 'cannot watch a directory');
      }
    }
  };

  const reload = async () => {
    const { files: nextFiles, directories } = await readAll();
    if (stopped) return;
    files = nextFiles;
    syncWatchers(directories);
    const next = merge(nextFiles);
    const previous = state;
    const moduleChanges: ModuleChange[] = [];
    for (const [k, m] of [...next.modules].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
      const old = previous.modules.get(k);
      if (!old) moduleChanges.push({ type: 'added', module: m });
      // An unchanged file yields the same parsed object: no need to compare 10,000 of them each pass.
      else if (old !== m && canonicalJson(old) !== canonicalJson(m)) moduleChanges.push({ type: 'modified', module: m });
    }
    for (const [k, m] of previous.modules) if (!next.modules.has(k)) moduleChanges.push({ type: 'deleted', module: m });
    for (const c of moduleChanges) {
      if (c.type === 'deleted') index.delete(moduleKey(c.module));
      else index.set(c.module);
    }
    const dependencyChanges: DependencyChange[] = [];
    if (isSynced) {
      const changed = (kind: 'Secret' | 'ConfigMap', key: string) => {
        const modules = index.modulesFor(kind, key);
        if (modules.length === 0) return;
        const slash = key.indexOf('/');
        dependencyChanges.push({ kind, namespace: key.slice(0, slash), name: key.slice(slash + 1), modules });
      };
      for (const k of new Set([...previous.secrets.keys(), ...next.secrets.keys()])) {
        const a = previous.secrets.get(k);
        const b = next.secrets.get(k);
        if (a?.type !== b?.type || !sameSecretData(a?.data, b?.data)) changed('Secret', k);
      }
      for (const k of new Set([...previous.configMaps.keys(), ...next.configMaps.keys()])) {
        if (!sameStringData(previous.configMaps.get(k), next.configMaps.get(k))) changed('ConfigMap', k);
      }
    }
    state = next;
    if (moduleChanges.length > 0) moduleList = [...next.modules.values()].sort((a, b) => (moduleKey(a) < moduleKey(b) ? -1 : 1));
    for (const c of moduleChanges) {
      log.info({ module: moduleKey(c.module), change: c.type }, 'Module changed');
      events.module(c);
    }
    for (const c of dependencyChanges) {
      log.info({ kind: c.kind, object: objectKey(c.namespace, c.name), modules: c.modules }, 'referenced object changed');
      events.dependency(c);
    }
    if (!isSynced) {
      isSynced = true;
      log.info({ modules: next.modules.size, secrets: next.secrets.size, configMaps: next.configMaps.size }, 'manifests read');
      resolveSynced();
    }
  };

  const trigger = () => {
    if (stopped) return;
    if (running) {
      again = true;
      return;
    }
    running = reload()
      .catch((err: unknown) => log.error({ err }, 'reading the manifests failed; keeping the previous state'))
      .finally(() => {
        running = undefined;
        if (again) {
          again = false;
          trigger();
        }
      });
  };

  const schedule = () => {
    if (stopped) return;
    if (debounceTimer) clearTimeout(debounceTimer);
    debounceTimer = setTimeout(() => {
      debounceTimer = undefined;
      trigger();
    }, debounceMs);
  };

  const poll = pollIntervalMs > 0 ? setInterval(trigger, pollIntervalMs) : undefined;
  trigger();

  const secretEntry = (namespace: string, name: string) => state.secrets.get(objectKey(namespace, name));
  return {
    modules: () => moduleList,
    pullSecret: (namespace, name) => dockerConfigJsonOf(secretEntry(namespace, name)?.data),
    secretData: (namespace, name) => secretEntry(namespace, name)?.data,
    configMapData: (namespace, name) => state.configMaps.get(objectKey(namespace, name)),
    synced,
    on: events.on.bind(events) as ClusterInputs['on'],
    async stop() {
      stopped = true;
      if (poll) clearInterval(poll);
      if (debounceTimer) clearTimeout(debounceTimer);
      for (const w of watchers.values()) w.close();
      watchers.clear();
      await running;
      if (!isSynced) rejectSynced(new Error('directory inputs stopped before the first read'));
    },
  };
}
