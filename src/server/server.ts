/**
 * Composition root of the running API server: storage, registries, authentication and TLS wired
 * together from a validated {@link Config}. Everything with an outside effect is created here.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { FastifyInstance } from 'fastify';
import type { Config } from '../config.ts';
import { RESOURCES } from '../api/resources.ts';
import { API_VERSION } from '../api/schema.ts';
import { createAjv } from '../api/validation.ts';
import { createFieldManager } from '../apply/field-manager.ts';
import type { Server as HttpsServer } from 'node:https';
import { allowAuthenticatedAuthorizer } from '../auth/standalone.ts';
import type { Authenticator, Authorizer } from '../auth/types.ts';
import { parseCertificateBundle, x509Authenticator } from '../auth/x509.ts';
import { startTlsReloader, type TlsReloader } from './tls-reloader.ts';
import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { createPreflightController, type PreflightController } from '../controller/controller.ts';
import { createDirectoryInputs } from '../controller/directory-inputs.ts';
import { createControllerMetrics } from '../controller/metrics.ts';
import { perRegistryLimit } from '../controller/registry-limit.ts';
import { createLocalBuilder } from '../build/local-builder.ts';
import type { Builder } from '../build/types.ts';
import { createSignStage } from '../engine/sign-stage.ts';
import type { ClusterInputs } from '../controller/inputs.ts';
import { createGateState, type ModuleSource } from '../gate/gate-state.ts';
import { CLUSTER_VERSION_WEBHOOK_PATH, reviewClusterVersionUpdate } from '../gate/upgrade-gate.ts';
import { createImageStage } from '../engine/image-stage.ts';
import { createDiskLayerCache, createMemoryLayerCache } from '../engine/layer-cache.ts';
import { logEventRecorder } from '../kube/log-events.ts';
import { createRegistryClient } from '../registry/client.ts';
import type { Registry } from 'prom-client';
import type { KmmModule } from '../engine/module.ts';
import type { Platform } from '../registry/types.ts';
import { ensureDevPki } from '../certs/dev-pki.ts';
import { openSqliteStore } from '../storage/sqlite-store.ts';
import type { Store } from '../storage/store.ts';
import { build } from './app.ts';
import { createApiMetrics } from './metrics.ts';
import { ResourceRegistry } from './registry.ts';

export const SERVER_VERSION = '0.1.0';

export interface RunningServer {
  readonly url: string;
  readonly port: number;
  readonly app: FastifyInstance;
  readonly store: Store;
  /** Stops accepting requests, ends watches, closes storage. */
  close(): Promise<void>;
}

export function createRegistries(store: Store, logger: Logger, options: { bookmarkIntervalMs?: number } = {}): ResourceRegistry[] {
  const ajv = createAjv();
  return RESOURCES.map(
    (definition) =>
      new ResourceRegistry({
        store,
        definition,
        ajv,
        logger,
        fieldManager: createFieldManager({
          schema: definition.schema as Record<string, unknown>,
          apiVersion: API_VERSION,
          resetFields: { main: [['status']], status: [['spec']] },
        }),
        ...(options.bookmarkIntervalMs !== undefined ? { bookmarkIntervalMs: options.bookmarkIntervalMs } : {}),
      }),
  );
}

/** Authentication, authorization and the client CAs the TLS layer must trust, per mode. */
export interface AuthWiring {
  readonly authenticator: Authenticator;
  readonly authorizer: Authorizer;
  readonly clientCas: () => readonly string[];
  stop(): Promise<void>;
}

async function standaloneAuth(config: Config): Promise<AuthWiring> {
  const caPem = await readFile(config.clientCaFile, 'utf8');
  const roots = parseCertificateBundle(caPem);
  return {
    authenticator: x509Authenticator(() => roots),
    authorizer: allowAuthenticatedAuthorizer(),
    clientCas: () => [caPem],
    stop: async () => {},
  };
}

export async function startServer(config: Config, logger: Logger): Promise<RunningServer> {
  if (config.generateDevCerts) {
    const host = config.listenAddress === '0.0.0.0' || config.listenAddress === '::' ? '127.0.0.1' : config.listenAddress;
    const r = await ensureDevPki({ dir: config.certDir, serverUrl: `https://${host.includes(':') ? `[${host}]` : host}:${config.port}` });
    if (r.created) logger.info({ dir: config.certDir, reason: r.reason }, 'created a development PKI and kubeconfig');
  }
  const [cert, key] = await Promise.all([readFile(config.tlsCertFile), readFile(config.tlsPrivateKeyFile)]);

  let reloader: TlsReloader | undefined;
  const auth =
    config.authenticationMode === 'delegated'
      ? await (async () => {
          // Loaded only when used: the Kubernetes client is a large module stand-alone mode never needs.
          const kube = await import('./kube-wiring.ts');
          return kube.delegatedAuth(config, kube.kubeConfigOf(config), logger, () => void reloader?.check());
        })()
      : await standaloneAuth(config);
  const store = await openStore(config, logger);
  const registries = createRegistries(store, logger, { bookmarkIntervalMs: config.watchBookmarkIntervalSeconds * 1000 });
  const metrics = createApiMetrics();
  // The ClusterVersion upgrade gate: in memory, fed by this server's own PreflightValidationOCP
  // objects and by the controller's inputs (the cluster's Modules), in every replica.
  const modules = deferredModuleSource();
  const controllerWanted = config.controller ?? (config.authenticationMode === 'delegated' || config.modulesDir !== undefined);
  const gateClient = createRegistryClient({ userAgent: `kmm-preflight/${SERVER_VERSION}` });
  const insecure = new Set(config.insecureRegistries);
  const gate = createGateState({
    pfvo: registries[1]!,
    ...(controllerWanted ? { modules } : {}),
    registry: gateClient,
    accessFor: (host) => ({ insecure: insecure.has(host) }),
    platform: { os: 'linux', architecture: config.architecture ?? 'amd64' },
    logger,
  });
  const gatePolicy = { mode: config.upgradeGatePolicy, honourForce: config.upgradeGateHonourForce };
  const app = await build({
    admission: [{ path: CLUSTER_VERSION_WEBHOOK_PATH, review: (body) => reviewClusterVersionUpdate(body, gate, gatePolicy) }],
    registries,
    store,
    logger,
    authenticator: auth.authenticator,
    authorizer: auth.authorizer,
    metrics,
    version: SERVER_VERSION,
    https: { cert, key, ca: [...auth.clientCas()].filter((c) => c !== ''), requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.2' },
  });
  await app.listen({ host: config.listenAddress, port: config.port });
  reloader = startTlsReloader({
    server: app.server as unknown as HttpsServer,
    certFile: config.tlsCertFile,
    keyFile: config.tlsPrivateKeyFile,
    clientCas: auth.clientCas,
    intervalMs: config.tlsReloadIntervalSeconds * 1000,
    logger,
  });
  await reloader.check();
  const address = app.server.address();
  const port = typeof address === 'object' && address ? address.port : config.port;
  const host = config.listenAddress.includes(':') ? `[${config.listenAddress}]` : config.listenAddress;
  const url = `https://${host}:${port}`;
  if (config.generateDevCerts && config.port === 0) {
    // An ephemeral port is known only now; point the kubeconfig at it.
    const h = config.listenAddress === '0.0.0.0' || config.listenAddress === '::' ? '127.0.0.1' : host;
    await ensureDevPki({ dir: config.certDir, serverUrl: `https://${h}:${port}` });
  }
  logger.info(
    { url, storage: store.name, authentication: config.authenticationMode, kubeconfig: join(config.certDir, 'kubeconfig') },
    'kmm-preflight API server listening',
  );

  // Not awaited: until the gate has read its inputs it refuses upgrades, saying so.
  void gate.start().catch((err: unknown) => logger.error({ err }, 'the upgrade gate could not start; upgrades are refused until it does'));
  const controller = await startControllerIfWanted(config, logger, registries, metrics.registry, (inputs) => modules.attach(inputs));
  // OpenShift: the kmm-preflight ClusterOperator mirrors the gate's verdict (Upgradeable).
  let operator: { stop(): Promise<void> } | undefined;
  if (config.authenticationMode === 'delegated') {
    const kube = await import('./kube-wiring.ts');
    const writer = kube.createClusterOperatorWriter({
      kubeConfig: kube.kubeConfigOf(config),
      gate,
      logger,
      health: () => store.ping(),
      namespace: config.leaderElectionNamespace,
      version: SERVER_VERSION,
      intervalMs: config.clusterOperatorIntervalSeconds * 1000,
    });
    writer.start();
    operator = writer;
  }

  let closing: Promise<void> | undefined;
  return {
    url,
    port,
    app,
    store,
    close: () => {
      closing ??= (async () => {
        reloader?.stop();
        await operator?.stop();
        await gate.stop();
        await controller?.stop();
        await gateClient.close();
        // Watches are long requests: end them so that close() does not wait for their timeout.
        app.server.closeAllConnections?.();
        await app.close();
        await auth.stop();
        await store.close();
      })();
      return closing;
    },
  };
}

async function openStore(config: Config, logger: Logger): Promise<Store> {
  if (config.storage === 'etcd') {
    const { openEtcdStore } = await import('../storage/etcd-store.ts');
    return openEtcdStore({
      endpoints: [...config.etcdServers],
      prefix: config.etcdPrefix,
      ...(config.etcdCaFile || config.etcdCertFile
        ? {
            tls: {
              ...(config.etcdCaFile ? { caFile: config.etcdCaFile } : {}),
              ...(config.etcdCertFile ? { certFile: config.etcdCertFile } : {}),
              ...(config.etcdKeyFile ? { keyFile: config.etcdKeyFile } : {}),
            },
          }
        : {}),
    });
  }
  return openSqliteStore({
    path: join(config.dataDir, 'kmm-preflight.db'),
    historySeconds: config.historySeconds,
    onBackgroundError: (err) => logger.error({ err }, 'storage compaction failed'),
  });
}

/**
 * The validation controller, when wanted: Modules from the cluster (delegated mode) or from a
 * directory (stand-alone), run only while holding the Lease when leader election is on.
 */
async function startControllerIfWanted(
  config: Config,
  logger: Logger,
  registries: readonly ResourceRegistry[],
  metricsRegistry: Registry,
  onInputs: (inputs: ClusterInputs) => void,
): Promise<{ stop(): Promise<void> } | undefined> {
  const delegated = config.authenticationMode === 'delegated';
  const wanted = config.controller ?? (delegated || config.modulesDir !== undefined);
  if (!wanted) return undefined;
  if (!delegated && !config.modulesDir) {
    throw new Error('the controller needs Modules: give --modules-dir in stand-alone mode, or run with --authentication-mode delegated');
  }
  const log = logger.child({ component: 'controller' });
  const kube = config.modulesDir ? undefined : await import('./kube-wiring.ts');
  const kc = kube?.kubeConfigOf(config);
  const inputs = kube && kc ? kube.createClusterInputs(kc, log) : createDirectoryInputs([config.modulesDir!], log);
  onInputs(inputs);
  const client = createRegistryClient({ userAgent: `kmm-preflight/${SERVER_VERSION}` });
  const cache = config.layerCacheDir ? createDiskLayerCache({ dir: config.layerCacheDir }) : createMemoryLayerCache();
  const imageStage = perRegistryLimit(createImageStage({ registry: client, cache, logger: log }), config.registryConcurrency);
  const [pfv, pfvo] = registries;
  const events = kube && kc ? kube.kubeEventRecorder(kc, log) : logEventRecorder(log);
  // A Module's own kubernetes.io/arch selector decides; else --architecture; else the nodes'
  // most common architecture; never this server's CPU.
  let nodeArchs: string[] = [];
  if (kube && kc && !config.architecture) {
    nodeArchs = await kube.nodeArchitectures(kc, log);
    log.info({ architectures: nodeArchs }, 'node architectures');
  }
  const defaultArch = config.architecture ?? nodeArchs[0] ?? 'amd64';
  const platformFor = (m: KmmModule): Platform => ({ os: 'linux', architecture: m.spec.selector?.['kubernetes.io/arch'] ?? defaultArch });
  const signStage = createSignStage({ registry: client, logger: log });
  const builderKind = config.builder ?? (kube ? 'job' : 'local');
  let builder: Builder | undefined;
  if (builderKind === 'job') {
    if (!kube || !kc) throw new Error('--builder job runs builds as Kubernetes Jobs and needs the cluster: use --builder local or none with --modules-dir');
    builder = kube.createJobBuilder({
      kubeConfig: kc,
      logger: log,
      timeoutMs: config.buildTimeoutSeconds * 1000,
      ...(config.builderImage ? { builderImage: config.builderImage } : {}),
    });
  } else if (builderKind === 'local') {
    builder = createLocalBuilder({ logger: log, timeoutMs: config.buildTimeoutSeconds * 1000 });
  }
  const make = () =>
    createPreflightController({
      signStage,
      ...(builder ? { builder } : { noBuilderReason: 'builds are turned off on this server (--builder none)' }),
      buildPollMs: config.buildPollSeconds * 1000,
      signHashAlgorithm: config.signHashAlgorithm,
      platformFor,
      pfv: pfv!,
      pfvo: pfvo!,
      inputs,
      imageStage,
      registryClient: client,
      platform: { os: 'linux', architecture: defaultArch },
      logger: log,
      events,
      concurrency: config.validationConcurrency,
      insecureRegistries: config.insecureRegistries,
      metrics,
    });
  const abort = new AbortController();
  let current: PreflightController | undefined;
  const metrics = createControllerMetrics(metricsRegistry, {
    queued: () => current?.stats.queued ?? 0,
    running: () => current?.stats.running ?? 0,
    registryBytes: () => client.bytesReceived,
  });
  let elector: Promise<void> | undefined;
  if ((config.leaderElect ?? delegated) && kube && kc) {
    const identity = `${hostname()}_${randomUUID().slice(0, 8)}`;
    elector = kube.createLeaderElector({
      lease: kube.kubeLeaseClient(kc, config.leaderElectionNamespace, 'kmm-preflight-controller'),
      name: 'kmm-preflight-controller',
      namespace: config.leaderElectionNamespace,
      identity,
      logger: log,
      onStartedLeading: async (signal) => {
        const c = make();
        current = c;
        // The term can end while the controller is still starting (inputs being listed).
        const ended = new Promise<void>((r) => (signal.aborted ? r() : signal.addEventListener('abort', () => r(), { once: true })));
        void ended.then(() => c.stop());
        await c.start();
        await ended;
        await c.stop();
        if (current === c) current = undefined;
      },
      onStoppedLeading: () => log.info({ identity }, 'stopped leading'),
    }).run(abort.signal);
  } else {
    current = make();
    await current.start();
  }
  return {
    async stop() {
      abort.abort();
      await elector;
      await current?.stop();
      await inputs.stop();
      await builder?.close();
      client.close();
    },
  };
}

/** The Modules for the upgrade gate, from the controller's inputs once they exist. */
function deferredModuleSource(): ModuleSource & { attach(inputs: ClusterInputs): void } {
  let inputs: ClusterInputs | undefined;
  let attached!: () => void;
  const ready = new Promise<void>((r) => (attached = r));
  const listeners: (() => void)[] = [];
  return {
    modules: () => inputs?.modules() ?? [],
    synced: ready.then(() => inputs!.synced),
    onChange: (l) => void listeners.push(l),
    attach(i) {
      inputs = i;
      i.on('module', () => {
        for (const l of listeners) l();
      });
      attached();
    },
  };
}
