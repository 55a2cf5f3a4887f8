/**
 * The kube-apiserver side of delegated authentication and authorization, through
 * @kubernetes/client-node: TokenReview, SubjectAccessReview, and a watch on the
 * extension-apiserver-authentication ConfigMap.
 */
import {
  AuthenticationV1Api,
  AuthorizationV1Api,
  CoreV1Api,
  ListWatch,
  Watch,
  type KubeConfig,
  type V1ConfigMap,
} from '@kubernetes/client-node';
import type { Logger } from 'pino';
import type { AccessReviewer, TokenReviewer } from '../auth/delegated.ts';
import { describeKubeError, withTimeout } from './errors.ts';
import { AUTHENTICATION_CONFIGMAP, parseAuthenticationConfigMap, type DelegatedAuthenticationConfig } from '../auth/authentication-configmap.ts';

export function kubeTokenReviewer(kc: KubeConfig, timeoutMs = 5000): TokenReviewer {
  const api = kc.makeApiClient(AuthenticationV1Api);
  return {
    async review(token) {
      try {
        const r = await withTimeout(
          api.createTokenReview({ body: { apiVersion: 'authentication.k8s.io/v1', kind: 'TokenReview', spec: { token } } }),
          timeoutMs,
          'TokenReview',
        );
        const s = r.status;
        if (!s?.authenticated || !s.user?.username) return { authenticated: false, ...(s?.error ? { error: s.error } : {}) };
        return {
          authenticated: true,
          user: {
            username: s.user.username,
            groups: s.user.groups ?? [],
            ...(s.user.uid ? { uid: s.user.uid } : {}),
            ...(s.user.extra ? { extra: s.user.extra } : {}),
          },
        };
      } catch (err) {
        throw new Error(`TokenReview failed: ${describeKubeError(err)}`, { cause: err });
      }
    },
  };
}

export function kubeAccessReviewer(kc: KubeConfig, timeoutMs = 5000): AccessReviewer {
  const api = kc.makeApiClient(AuthorizationV1Api);
  return {
    async review(a) {
      try {
        const r = await withTimeout(
          api.createSubjectAccessReview({
            body: {
              apiVersion: 'authorization.k8s.io/v1',
              kind: 'SubjectAccessReview',
              spec: {
                user: a.user.username,
                groups: [...a.user.groups],
                ...(a.user.uid ? { uid: a.user.uid } : {}),
                ...(a.user.extra ? { extra: Object.fromEntries(Object.entries(a.user.extra).map(([k, v]) => [k, [...v]])) } : {}),
                ...(a.isResourceRequest
                  ? {
                      resourceAttributes: {
                        verb: a.verb,
                        group: a.apiGroup ?? '',
                        version: a.apiVersion ?? '',
                        resource: a.resource ?? '',
                        subresource: a.subresource ?? '',
                        name: a.name ?? '',
                        namespace: a.namespace ?? '',
                      },
                    }
                  : { nonResourceAttributes: { path: a.path, verb: a.verb } }),
              },
            },
          }),
          timeoutMs,
          'SubjectAccessReview',
        );
        const s = r.status;
        return {
          allowed: s?.allowed === true,
          ...(s?.denied !== undefined ? { denied: s.denied } : {}),
          ...(s?.reason ? { reason: s.reason } : {}),
          ...(s?.evaluationError ? { evaluationError: s.evaluationError } : {}),
        };
      } catch (err) {
        throw new Error(`SubjectAccessReview failed: ${describeKubeError(err)}`, { cause: err });
      }
    },
  };
}

export interface AuthenticationConfigWatch {
  /** The current configuration; undefined until first read. */
  current(): DelegatedAuthenticationConfig | undefined;
  /** Resolves once the ConfigMap was read the first time. */
  readonly ready: Promise<void>;
  stop(): Promise<void>;
}

/**
 * Keeps the extension-apiserver-authentication ConfigMap in memory through an informer (list,
 * then watch, re-listing on 410), so a CA rotation applies without a restart.
 */
export function watchAuthenticationConfig(
  kc: KubeConfig,
  logger: Logger,
  onChange: (config: DelegatedAuthenticationConfig) => void,
): AuthenticationConfigWatch {
  const core = kc.makeApiClient(CoreV1Api);
  const { namespace, name } = AUTHENTICATION_CONFIGMAP;
  // The extension-apiserver-authentication-reader Role grants this one ConfigMap by name, so the
  // list and the watch must select it by name too.
  const fieldSelector = `metadata.name=${name}`;
  const informer = new ListWatch<V1ConfigMap>(
    `/api/v1/namespaces/${namespace}/configmaps`,
    new Watch(kc),
    () => core.listNamespacedConfigMap({ namespace, fieldSelector }),
    false,
    undefined,
    fieldSelector,
  );
  let config: DelegatedAuthenticationConfig | undefined;
  let resolveReady!: () => void;
  const ready = new Promise<void>((r) => (resolveReady = r));
  let lastData = '';
  const apply = (cm: V1ConfigMap) => {
    if (cm.metadata?.name !== name) return;
    const data = cm.data ?? {};
    const text = JSON.stringify(data);
    if (text === lastData) return;
    try {
      config = parseAuthenticationConfigMap(data);
      lastData = text;
      logger.info({ configmap: `${namespace}/${name}`, frontProxy: config.requestHeader !== undefined }, 'authentication configuration loaded');
      onChange(config);
      resolveReady();
    } catch (err) {
      logger.error({ err }, 'authentication configuration rejected; keeping the previous one');
    }
  };
  informer.on('add', apply);
  informer.on('update', apply);
  let stopped = false;
  informer.on('error', (err: unknown) => {
    // Stopping aborts the open watch, which reports an error: that one is not retried.
    if (stopped) return;
    logger.warn({ error: describeKubeError(err) }, 'watch of the authentication ConfigMap failed; retrying');
    setTimeout(() => {
      if (!stopped) void informer.start().catch(() => undefined);
    }, 2000).unref();
  });
  void informer.start().catch((err: unknown) => logger.warn({ error: describeKubeError(err) }, 'could not start the authentication ConfigMap watch'));
  return {
    current: () => config,
    ready,
    stop: async () => {
      stopped = true;
      await informer.stop();
    },
  };
}
