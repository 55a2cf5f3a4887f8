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
import { allowAuthenticatedAuthorizer, clientCertificateAuthenticator } from '../auth/client-cert.ts';
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

export async function startServer(config: Config, logger: Logger): Promise<RunningServer> {
  if (config.generateDevCerts) {
    const host = config.listenAddress === '0.0.0.0' || config.listenAddress === '::' ? '127.0.0.1' : config.listenAddress;
    const r = await ensureDevPki({ dir: config.certDir, serverUrl: `https://${host.includes(':') ? `[${host}]` : host}:${config.port}` });
    if (r.created) logger.info({ dir: config.certDir, reason: r.reason }, 'created a development PKI and kubeconfig');
  }
  const [cert, key, ca] = await Promise.all([
    readFile(config.tlsCertFile),
    readFile(config.tlsPrivateKeyFile),
    readFile(config.clientCaFile),
  ]);

  const store = await openSqliteStore({
    path: join(config.dataDir, 'kmm-preflight.db'),
    historySeconds: config.historySeconds,
    onBackgroundError: (err) => logger.error({ err }, 'storage compaction failed'),
  });
  const registries = createRegistries(store, logger, { bookmarkIntervalMs: config.watchBookmarkIntervalSeconds * 1000 });
  const app = await build({
    registries,
    store,
    logger,
    authenticator: clientCertificateAuthenticator(),
    authorizer: allowAuthenticatedAuthorizer(),
    metrics: createApiMetrics(),
    version: SERVER_VERSION,
    https: { cert, key, ca, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.2' },
  });
  await app.listen({ host: config.listenAddress, port: config.port });
  const address = app.server.address();
  const port = typeof address === 'object' && address ? address.port : config.port;
  const host = config.listenAddress.includes(':') ? `[${config.listenAddress}]` : config.listenAddress;
  const url = `https://${host}:${port}`;
  if (config.generateDevCerts && config.port === 0) {
    // An ephemeral port is known only now; point the kubeconfig at it.
    const h = config.listenAddress === '0.0.0.0' || config.listenAddress === '::' ? '127.0.0.1' : host;
    await ensureDevPki({ dir: config.certDir, serverUrl: `https://${h}:${port}` });
  }
  logger.info({ url, storage: store.name, kubeconfig: join(config.certDir, 'kubeconfig') }, 'kmm-preflight API server listening');

  let closing: Promise<void> | undefined;
  return {
    url,
    port,
    app,
    store,
    close: () => {
      closing ??= (async () => {
        // Watches are long requests: end them so that close() does not wait for their timeout.
        app.server.closeAllConnections?.();
        await app.close();
        await store.close();
      })();
      return closing;
    },
  };
}
