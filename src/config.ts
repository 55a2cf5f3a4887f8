/**
 * Configuration in one place: command-line flags over environment variables over defaults,
 * validated once against a JSON Schema (every error names its option), then frozen. No other
 * module reads the environment.
 */
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { Type, type Static } from '@sinclair/typebox';
import { Ajv } from 'ajv';

export const ConfigSchema = Type.Object(
  {
    listenAddress: Type.String({ minLength: 1, description: 'Address to listen on.' }),
    port: Type.Integer({ minimum: 0, maximum: 65535, description: 'HTTPS port.' }),
    storage: Type.Unsafe<'sqlite' | 'etcd'>({ type: 'string', enum: ['sqlite', 'etcd'], description: 'Storage backend.' }),
    etcdServers: Type.Array(Type.String({ pattern: '^https?://[^\\s,]+$' }), { description: 'etcd client URLs.' }),
    etcdPrefix: Type.String({ pattern: '^/', description: 'Key prefix in etcd.' }),
    etcdCaFile: Type.Optional(Type.String({ minLength: 1, description: 'CA of the etcd servers (PEM).' })),
    etcdCertFile: Type.Optional(Type.String({ minLength: 1, description: 'Client certificate for etcd (PEM).' })),
    etcdKeyFile: Type.Optional(Type.String({ minLength: 1, description: 'Client key for etcd (PEM).' })),
    authenticationMode: Type.Unsafe<'standalone' | 'delegated'>({
      type: 'string',
      enum: ['standalone', 'delegated'],
      description: 'standalone: client certificates of client-ca-file; delegated: behind kube-apiserver (front proxy, TokenReview, SubjectAccessReview).',
    }),
    kubeconfig: Type.Optional(Type.String({ minLength: 1, description: 'Kubeconfig for kube-apiserver; in-cluster config when unset.' })),
    tlsReloadIntervalSeconds: Type.Number({ exclusiveMinimum: 0, description: 'How often serving-certificate files are checked for changes.' }),
    authenticationCacheTtlSeconds: Type.Number({ minimum: 0, description: 'How long TokenReview answers are cached.' }),
    authorizationAllowTtlSeconds: Type.Number({ minimum: 0, description: 'How long allowed SubjectAccessReview answers are cached.' }),
    authorizationDenyTtlSeconds: Type.Number({ minimum: 0, description: 'How long denied SubjectAccessReview answers are cached.' }),
    controller: Type.Optional(Type.Boolean({ description: 'Run the validation controller (default: in delegated mode, or with --modules-dir).' })),
    modulesDir: Type.Optional(Type.String({ minLength: 1, description: 'Stand-alone mode: a directory of Module manifests, re-read on change.' })),
    architecture: Type.Optional(
      Type.String({ minLength: 1, description: "Target architecture when a Module does not select one (kubernetes.io/arch); default: the cluster nodes', else amd64." }),
    ),
    validationConcurrency: Type.Integer({ minimum: 1, maximum: 1024, description: 'Module validations run at once.' }),
    registryConcurrency: Type.Integer({ minimum: 1, maximum: 1024, description: 'Module validations talking to one registry at once.' }),
    layerCacheDir: Type.Optional(Type.String({ minLength: 1, description: 'Keep layer scans on disk across restarts.' })),
    leaderElect: Type.Optional(Type.Boolean({ description: 'Run the controller only while holding the Lease (default: in delegated mode).' })),
    leaderElectionNamespace: Type.String({ minLength: 1, description: 'Namespace of the controller Lease.' }),
    insecureRegistries: Type.Array(Type.String({ minLength: 1 }), {
      description: 'Registries (host[:port]) read over plain HTTP for OpenShift release and driver-toolkit images.',
    }),
    builder: Type.Optional(
      Type.Unsafe<'job' | 'local' | 'none'>({
        type: 'string',
        enum: ['job', 'local', 'none'],
        description: 'How the Build stage runs: job (Kubernetes Jobs, default in delegated mode), local (buildah on this machine, default stand-alone), none (builds reported as unavailable).',
      }),
    ),
    builderImage: Type.Optional(Type.String({ minLength: 1, description: 'Builder image of build Jobs (kaniko); a Module\'s kanikoParams.tag replaces its tag.' })),
    buildTimeoutSeconds: Type.Number({ exclusiveMinimum: 0, description: 'A build not finished after this long fails as timed out.' }),
    buildPollSeconds: Type.Number({ exclusiveMinimum: 0, description: 'How often a running build is looked at again.' }),
    signHashAlgorithm: Type.Unsafe<'sha256' | 'sha384' | 'sha512'>({
      type: 'string',
      enum: ['sha256', 'sha384', 'sha512'],
      description: 'Hash algorithm of kernel-module signatures (as sign-file\'s first argument).',
    }),
    upgradeGatePolicy: Type.Unsafe<'enforce' | 'warn'>({
      type: 'string',
      enum: ['enforce', 'warn'],
      description: 'ClusterVersion webhook: enforce refuses an upgrade to a release whose Modules are not all verified; warn allows it with warnings.',
    }),
    upgradeGateHonourForce: Type.Boolean({ description: 'ClusterVersion webhook: spec.desiredUpdate.force bypasses the gate (with a warning and an audit annotation).' }),
    clusterOperatorIntervalSeconds: Type.Number({ exclusiveMinimum: 0, description: 'OpenShift: how often the kmm-preflight ClusterOperator status is recomputed.' }),
    dataDir: Type.String({ minLength: 1, description: 'Directory of the embedded database.' }),
    certDir: Type.String({ minLength: 1, description: 'Directory of the development PKI.' }),
    tlsCertFile: Type.String({ minLength: 1, description: 'Serving certificate (PEM).' }),
    tlsPrivateKeyFile: Type.String({ minLength: 1, description: 'Serving key (PEM).' }),
    clientCaFile: Type.String({ minLength: 1, description: 'CA that signs client certificates (PEM).' }),
    generateDevCerts: Type.Boolean({ description: 'Create a development PKI in certDir when files are missing.' }),
    logLevel: Type.Unsafe<'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent'>({
      type: 'string',
      enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'],
      description: 'Log level.',
    }),
    watchBookmarkIntervalSeconds: Type.Number({ exclusiveMinimum: 0, description: 'Interval of watch bookmarks.' }),
    historySeconds: Type.Integer({ minimum: 1, description: 'Seconds of history kept for watch and paginated lists.' }),
  },
  { additionalProperties: false },
);

export type Config = Readonly<Static<typeof ConfigSchema>>;

/** Option name on the command line, environment variable, and how to read the text. */
const OPTIONS = {
  listenAddress: { flag: 'listen-address', env: 'KMM_PREFLIGHT_LISTEN_ADDRESS', kind: 'string' },
  port: { flag: 'port', env: 'KMM_PREFLIGHT_PORT', kind: 'integer' },
  storage: { flag: 'storage', env: 'KMM_PREFLIGHT_STORAGE', kind: 'string' },
  etcdServers: { flag: 'etcd-servers', env: 'KMM_PREFLIGHT_ETCD_SERVERS', kind: 'list' },
  etcdPrefix: { flag: 'etcd-prefix', env: 'KMM_PREFLIGHT_ETCD_PREFIX', kind: 'string' },
  etcdCaFile: { flag: 'etcd-cafile', env: 'KMM_PREFLIGHT_ETCD_CAFILE', kind: 'path' },
  etcdCertFile: { flag: 'etcd-certfile', env: 'KMM_PREFLIGHT_ETCD_CERTFILE', kind: 'path' },
  etcdKeyFile: { flag: 'etcd-keyfile', env: 'KMM_PREFLIGHT_ETCD_KEYFILE', kind: 'path' },
  authenticationMode: { flag: 'authentication-mode', env: 'KMM_PREFLIGHT_AUTHENTICATION_MODE', kind: 'string' },
  kubeconfig: { flag: 'kubeconfig', env: 'KMM_PREFLIGHT_KUBECONFIG', kind: 'path' },
  tlsReloadIntervalSeconds: { flag: 'tls-reload-interval', env: 'KMM_PREFLIGHT_TLS_RELOAD_INTERVAL', kind: 'number' },
  authenticationCacheTtlSeconds: { flag: 'authentication-cache-ttl', env: 'KMM_PREFLIGHT_AUTHENTICATION_CACHE_TTL', kind: 'number' },
  authorizationAllowTtlSeconds: { flag: 'authorization-allow-ttl', env: 'KMM_PREFLIGHT_AUTHORIZATION_ALLOW_TTL', kind: 'number' },
  authorizationDenyTtlSeconds: { flag: 'authorization-deny-ttl', env: 'KMM_PREFLIGHT_AUTHORIZATION_DENY_TTL', kind: 'number' },
  controller: { flag: 'controller', env: 'KMM_PREFLIGHT_CONTROLLER', kind: 'boolean' },
  modulesDir: { flag: 'modules-dir', env: 'KMM_PREFLIGHT_MODULES_DIR', kind: 'path' },
  architecture: { flag: 'architecture', env: 'KMM_PREFLIGHT_ARCHITECTURE', kind: 'string' },
  validationConcurrency: { flag: 'validation-concurrency', env: 'KMM_PREFLIGHT_VALIDATION_CONCURRENCY', kind: 'integer' },
  registryConcurrency: { flag: 'registry-concurrency', env: 'KMM_PREFLIGHT_REGISTRY_CONCURRENCY', kind: 'integer' },
  layerCacheDir: { flag: 'layer-cache-dir', env: 'KMM_PREFLIGHT_LAYER_CACHE_DIR', kind: 'path' },
  leaderElect: { flag: 'leader-elect', env: 'KMM_PREFLIGHT_LEADER_ELECT', kind: 'boolean' },
  leaderElectionNamespace: { flag: 'leader-election-namespace', env: 'KMM_PREFLIGHT_LEADER_ELECTION_NAMESPACE', kind: 'string' },
  insecureRegistries: { flag: 'insecure-registries', env: 'KMM_PREFLIGHT_INSECURE_REGISTRIES', kind: 'list' },
  builder: { flag: 'builder', env: 'KMM_PREFLIGHT_BUILDER', kind: 'string' },
  builderImage: { flag: 'builder-image', env: 'KMM_PREFLIGHT_BUILDER_IMAGE', kind: 'string' },
  buildTimeoutSeconds: { flag: 'build-timeout', env: 'KMM_PREFLIGHT_BUILD_TIMEOUT', kind: 'number' },
  buildPollSeconds: { flag: 'build-poll-interval', env: 'KMM_PREFLIGHT_BUILD_POLL_INTERVAL', kind: 'number' },
  signHashAlgorithm: { flag: 'sign-hash-algorithm', env: 'KMM_PREFLIGHT_SIGN_HASH_ALGORITHM', kind: 'string' },
  upgradeGatePolicy: { flag: 'upgrade-gate-policy', env: 'KMM_PREFLIGHT_UPGRADE_GATE_POLICY', kind: 'string' },
  upgradeGateHonourForce: { flag: 'upgrade-gate-honour-force', env: 'KMM_PREFLIGHT_UPGRADE_GATE_HONOUR_FORCE', kind: 'boolean' },
  clusterOperatorIntervalSeconds: { flag: 'cluster-operator-interval', env: 'KMM_PREFLIGHT_CLUSTER_OPERATOR_INTERVAL', kind: 'number' },
  dataDir: { flag: 'data-dir', env: 'KMM_PREFLIGHT_DATA_DIR', kind: 'string' },
  certDir: { flag: 'cert-dir', env: 'KMM_PREFLIGHT_CERT_DIR', kind: 'string' },
  tlsCertFile: { flag: 'tls-cert-file', env: 'KMM_PREFLIGHT_TLS_CERT_FILE', kind: 'string' },
  tlsPrivateKeyFile: { flag: 'tls-private-key-file', env: 'KMM_PREFLIGHT_TLS_PRIVATE_KEY_FILE', kind: 'string' },
  clientCaFile: { flag: 'client-ca-file', env: 'KMM_PREFLIGHT_CLIENT_CA_FILE', kind: 'string' },
  generateDevCerts: { flag: 'generate-dev-certs', env: 'KMM_PREFLIGHT_GENERATE_DEV_CERTS', kind: 'boolean' },
  logLevel: { flag: 'log-level', env: 'KMM_PREFLIGHT_LOG_LEVEL', kind: 'string' },
  watchBookmarkIntervalSeconds: { flag: 'watch-bookmark-interval', env: 'KMM_PREFLIGHT_WATCH_BOOKMARK_INTERVAL', kind: 'number' },
  historySeconds: { flag: 'history-seconds', env: 'KMM_PREFLIGHT_HISTORY_SECONDS', kind: 'integer' },
} as const;

type Key = keyof typeof OPTIONS;

export class ConfigError extends Error {
  readonly problems: readonly string[];
  constructor(problems: readonly string[]) {
    super(`invalid configuration: ${problems.join('; ')}`);
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

function convert(kind: string, text: string): unknown {
  if (kind === 'integer' || kind === 'number') {
    // Text that is not a number stays text, so the error shows what was given.
    const n = Number(text);
    return text.trim() === '' || Number.isNaN(n) ? text : n;
  }
  if (kind === 'boolean') return text === 'true' ? true : text === 'false' ? false : text;
  if (kind === 'list') return text.split(',').map((v) => v.trim()).filter((v) => v !== '');
  return text;
}

/**
 * Reads flags (`--port 8443`), then `KMM_PREFLIGHT_*` variables, then defaults. Throws
 * {@link ConfigError} listing every bad option by its flag name.
 */
export function loadConfig(argv: readonly string[], env: Readonly<Record<string, string | undefined>>, cwd: string): Config {
  const { values } = parseArgs({
    args: [...argv],
    options: Object.fromEntries(Object.values(OPTIONS).map((o) => [o.flag, { type: 'string' as const }])),
    strict: true,
    allowPositionals: false,
  });
  const raw: Record<string, unknown> = {};
  for (const [key, o] of Object.entries(OPTIONS) as [Key, (typeof OPTIONS)[Key]][]) {
    const text = (values[o.flag] as string | undefined) ?? env[o.env];
    if (text !== undefined) raw[key] = convert(o.kind, text);
  }
  const certDir = resolve(cwd, (raw['certDir'] as string | undefined) ?? 'certs');
  const config = {
    listenAddress: '127.0.0.1',
    port: 8443,
    storage: 'sqlite',
    dataDir: resolve(cwd, 'data'),
    generateDevCerts: true,
    logLevel: 'info',
    watchBookmarkIntervalSeconds: 60,
    historySeconds: 300,
    etcdServers: [],
    etcdPrefix: '/registry/kmm.sigs.x-k8s.io',
    authenticationMode: 'standalone',
    tlsReloadIntervalSeconds: 10,
    authenticationCacheTtlSeconds: 10,
    authorizationAllowTtlSeconds: 10,
    authorizationDenyTtlSeconds: 10,
    validationConcurrency: 16,
    registryConcurrency: 8,
    leaderElectionNamespace: env['POD_NAMESPACE'] ?? 'kmm-preflight',
    insecureRegistries: [],
    buildTimeoutSeconds: 1800,
    buildPollSeconds: 10,
    signHashAlgorithm: 'sha256',
    upgradeGatePolicy: 'enforce',
    upgradeGateHonourForce: true,
    clusterOperatorIntervalSeconds: 10,
    tlsCertFile: resolve(certDir, 'server.crt'),
    tlsPrivateKeyFile: resolve(certDir, 'server.key'),
    clientCaFile: resolve(certDir, 'ca.crt'),
    ...raw,
    certDir,
  } as Record<string, unknown>;
  for (const k of ['dataDir', 'tlsCertFile', 'tlsPrivateKeyFile', 'clientCaFile', 'etcdCaFile', 'etcdCertFile', 'etcdKeyFile', 'kubeconfig', 'modulesDir', 'layerCacheDir'] as const) {
    if (typeof config[k] === 'string') config[k] = resolve(cwd, config[k]);
  }
  const ajv = new Ajv({ allErrors: true, strict: false });
  const validate = ajv.compile(ConfigSchema);
  const valid = validate(config);
  const crossChecks: string[] = [];
  if (config['storage'] === 'etcd' && (config['etcdServers'] as unknown[]).length === 0) {
    crossChecks.push('--etcd-servers (KMM_PREFLIGHT_ETCD_SERVERS) is required with --storage etcd');
  }
  if ((config['etcdCertFile'] === undefined) !== (config['etcdKeyFile'] === undefined)) {
    crossChecks.push('--etcd-certfile and --etcd-keyfile go together');
  }
  if (valid && crossChecks.length > 0) throw new ConfigError(crossChecks);
  if (!valid) {
    // One sentence per option: the first thing wrong with it.
    const byOption = new Map<string, string>();
    for (const e of validate.errors ?? []) {
      const key = e.instancePath.slice(1).split('/')[0] as Key;
      const o = OPTIONS[key];
      const name = o ? `--${o.flag} (${o.env})` : key || String((e.params as { additionalProperty?: string }).additionalProperty);
      if (!byOption.has(name)) {
        byOption.set(name, `${name} ${e.message ?? 'is invalid'}${e.instancePath ? `, got ${JSON.stringify(config[key])}` : ''}`);
      }
    }
    throw new ConfigError([...byOption.values(), ...crossChecks]);
  }
  return Object.freeze(config) as Config;
}

export const CONFIG_OPTIONS = OPTIONS;
