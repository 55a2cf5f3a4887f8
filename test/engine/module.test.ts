import t from 'tap';
import { parse as parseYaml } from 'yaml';
import {
  applyBuildArgOverrides,
  kernelVersionParts,
  moduleKey,
  normalizeKernelVersion,
  parseModule,
  resolveModuleForKernel,
  validateModule,
  type KernelMapping,
  type KmmModule,
  type MappingResolution,
  type ResolvedMapping,
} from '../../src/engine/module.ts';
import { substituteTemplate } from '../../src/engine/templates.ts';

/** A Module in the API's JSON form, with `container` fields merged over a minimal valid one. */
function manifest(container: Record<string, unknown>, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    apiVersion: 'kmm.sigs.x-k8s.io/v1beta1',
    kind: 'Module',
    metadata: { name: 'gpu-kmod', namespace: 'drivers', generation: 3, resourceVersion: '812', uid: 'b6c1e1a4-5a0e-4a8e-9d43-0f6f3c9b7a11' },
    spec: {
      selector: { 'node-role.kubernetes.io/worker': '' },
      moduleLoader: { container: { modprobe: { moduleName: 'gpu_kmod' }, ...container } },
      ...extra,
    },
  };
}

function load(obj: unknown): KmmModule {
  const r = parseModule(obj);
  if (!r.ok) throw new Error(`unexpected parse errors: ${r.errors.join('; ')}`);
  return r.module;
}

function moduleWith(kernelMappings: KernelMapping[], container: Record<string, unknown> = {}): KmmModule {
  return load(manifest({ kernelMappings, ...container }));
}

function mapped(r: MappingResolution): ResolvedMapping {
  if (r.kind !== 'mapping') throw new Error(`expected a mapping, got ${r.kind}: ${r.reason}`);
  return r.mapping;
}

t.test('a literal mapping wins over a later regexp that also matches', async (t) => {
  const m = moduleWith([
    { literal: '6.1.0-13-amd64', containerImage: 'quay.io/acme/gpu:literal' },
    { regexp: '^6\\.1\\.', containerImage: 'quay.io/acme/gpu:regexp' },
  ]);
  const r = mapped(resolveModuleForKernel(m, '6.1.0-13-amd64'));
  t.same(r.matchedBy, { literal: '6.1.0-13-amd64' });
  t.equal(r.containerImage, 'quay.io/acme/gpu:literal');
  t.same(mapped(resolveModuleForKernel(m, '6.1.0-18-amd64')).matchedBy, { regexp: '^6\\.1\\.' }, 'literal is exact');
});

t.test('the first matching mapping in list order wins', async (t) => {
  const m = moduleWith([
    { regexp: 'el9', containerImage: 'quay.io/acme/gpu:el9' },
    { regexp: '^5\\.14', containerImage: 'quay.io/acme/gpu:5.14' },
    { literal: '5.14.0-284.30.1.el9_2.x86_64', containerImage: 'quay.io/acme/gpu:exact' },
  ]);
  const r = mapped(resolveModuleForKernel(m, '5.14.0-284.30.1.el9_2.x86_64'));
  t.same(r.matchedBy, { regexp: 'el9' });
  t.equal(r.containerImage, 'quay.io/acme/gpu:el9');
});

t.test('a regexp is an unanchored search, as Go regexp.MatchString', async (t) => {
  const anchored = moduleWith([{ regexp: '^6\\.1', containerImage: 'quay.io/acme/gpu:a' }]);
  const inside = moduleWith([{ regexp: '6\\.1', containerImage: 'quay.io/acme/gpu:b' }]);
  const kernel = '5.16.1-200.fc35.x86_64';
  t.equal(resolveModuleForKernel(anchored, kernel).kind, 'no-mapping', '^6\\.1 does not match 5.16.1');
  t.equal(mapped(resolveModuleForKernel(inside, kernel)).containerImage, 'quay.io/acme/gpu:b', '6\\.1 matches inside 5.16.1');
  const dollar = moduleWith([{ regexp: 'amd64$', containerImage: 'quay.io/acme/gpu:c' }]);
  t.equal(resolveModuleForKernel(dollar, '6.1.0-13-amd64').kind, 'mapping');
  t.equal(resolveModuleForKernel(dollar, '6.1.0-13-amd64-rt').kind, 'no-mapping', '$ is the end of the text');
});

t.test('no matching mapping: the reason names the kernel, the Module and its mappings', async (t) => {
  const m = moduleWith([
    { literal: '6.0.15-300.fc37.x86_64', containerImage: 'quay.io/acme/gpu:a' },
    { regexp: '^.+\\.el9', containerImage: 'quay.io/acme/gpu:b' },
  ]);
  const r = resolveModuleForKernel(m, '6.8.0-31-generic');
  t.equal(r.kind, 'no-mapping');
  t.equal(
    r.kind === 'no-mapping' ? r.reason : '',
    'no kernelMapping of Module drivers/gpu-kmod matches kernel 6.8.0-31-generic (mappings: literal "6.0.15-300.fc37.x86_64", regexp "^.+\\\\.el9")',
  );
});

t.test('a Module without spec.moduleLoader has nothing to validate', async (t) => {
  const m = load({
    apiVersion: 'kmm.sigs.x-k8s.io/v1beta1',
    kind: 'Module',
    metadata: { name: 'dp-only', namespace: 'drivers' },
    spec: { selector: { 'feature.node.kubernetes.io/pci-10de.present': 'true' }, devicePlugin: { container: { image: 'quay.io/acme/dp:1' } } },
  });
  const r = resolveModuleForKernel(m, '6.1.0-13-amd64');
  t.equal(r.kind, 'nothing-to-validate');
  t.match(r.kind === 'nothing-to-validate' ? r.reason : '', /Module drivers\/dp-only has no spec\.moduleLoader/);
});

t.test("the mapping's image and registryTLS replace the container's; otherwise the container's apply", async (t) => {
  const m = moduleWith(
    [
      { literal: '6.1.0-13-amd64', containerImage: 'registry.lab:5000/gpu:6.1', registryTLS: { insecure: true } },
      { regexp: '.', registryTLS: {} },
      { regexp: 'never' },
    ],
    { containerImage: 'quay.io/acme/gpu:default', registryTLS: { insecureSkipTLSVerify: true } },
  );
  const a = mapped(resolveModuleForKernel(m, '6.1.0-13-amd64'));
  t.equal(a.containerImage, 'registry.lab:5000/gpu:6.1');
  t.same(a.registryTLS, { insecure: true, insecureSkipTLSVerify: false }, "the mapping's TLS options replace the container's whole");
  const b = mapped(resolveModuleForKernel(m, '6.1.0-18-amd64'));
  t.equal(b.containerImage, 'quay.io/acme/gpu:default', "no image in the mapping: the container's");
  t.same(b.registryTLS, { insecure: false, insecureSkipTLSVerify: false }, 'an empty registryTLS in the mapping still replaces');
  const c = mapped(resolveModuleForKernel(moduleWith([{ regexp: '.' }], { containerImage: 'quay.io/acme/gpu:x', registryTLS: { insecureSkipTLSVerify: true } }), '6.1.0-1'));
  t.same(c.registryTLS, { insecure: false, insecureSkipTLSVerify: true }, "no registryTLS in the mapping: the container's");
  t.equal(c.dirName, '/opt', 'dirName defaults to /opt');
  t.equal(c.moduleName, 'gpu_kmod');
});

t.test('build args are overridden by name (the mapping wins), then KMM sets its own', async (t) => {
  const m = moduleWith(
    [
      {
        regexp: '^6\\.',
        containerImage: 'quay.io/acme/gpu:$KERNEL_FULL_VERSION',
        build: {
          buildArgs: [
            { name: 'DRIVER_VERSION', value: '550.54' },
            { name: 'ZLIB', value: 'on' },
            { name: 'CUDA', value: '12.4' },
            { name: 'KERNEL_VERSION', value: 'user-set' },
          ],
          secrets: [{ name: 'git-token' }],
          dockerfileConfigMap: { name: 'gpu-dockerfile-6x' },
        },
      },
    ],
    {
      build: {
        buildArgs: [
          { name: 'DRIVER_VERSION', value: '535.0' },
          { name: 'ARCH', value: 'x86_64' },
        ],
        secrets: [{ name: 'base-secret' }],
        dockerfileConfigMap: { name: 'gpu-dockerfile' },
        baseImageRegistryTLS: { insecure: true },
        kanikoParams: { tag: 'v1.23.0' },
      },
    },
  );
  const b = mapped(resolveModuleForKernel(m, '6.1.0-13-amd64')).build;
  t.ok(b);
  t.same(b?.buildArgs, [
    { name: 'DRIVER_VERSION', value: '550.54' },
    { name: 'ARCH', value: 'x86_64' },
    { name: 'CUDA', value: '12.4' },
    { name: 'KERNEL_VERSION', value: '6.1.0-13-amd64' },
    { name: 'ZLIB', value: 'on' },
    { name: 'KERNEL_FULL_VERSION', value: '6.1.0-13-amd64' },
    { name: 'MOD_NAME', value: 'gpu-kmod' },
    { name: 'MOD_NAMESPACE', value: 'drivers' },
  ], "Module args overridden in place, the mapping's new ones appended sorted by name, then KMM's");
  t.equal(b?.dockerfileConfigMap, 'gpu-dockerfile-6x');
  t.same(b?.secrets, ['base-secret', 'git-token']);
  t.same(b?.baseImageRegistryTLS, { insecure: true, insecureSkipTLSVerify: false });
  t.equal(b?.kanikoTag, 'v1.23.0');
  t.same(applyBuildArgOverrides([{ name: 'A', value: '1' }, { name: 'A', value: '2' }], [{ name: 'A', value: '3' }]), [
    { name: 'A', value: '3' },
    { name: 'A', value: '3' },
  ], 'every argument of the name is overridden');
  t.equal(mapped(resolveModuleForKernel(moduleWith([{ regexp: '.', containerImage: 'x/y:z' }]), '6.1.0-1')).build, undefined, 'no build anywhere: none');
});

t.test('sign: mapping fields override, filesToSign appended, images and files templated', async (t) => {
  const m = moduleWith(
    [
      {
        regexp: '^5\\.14',
        containerImage: 'quay.io/acme/gpu-signed:${KERNEL_FULL_VERSION}',
        sign: {
          unsignedImage: 'quay.io/acme/gpu-unsigned:${KERNEL_XYZ}-$MOD_NAME',
          keySecret: { name: 'el9-key' },
          certSecret: { name: 'el9-cert' },
          unsignedImageRegistryTLS: { insecure: true },
          filesToSign: ['/opt/lib/modules/${KERNEL_FULL_VERSION}/gpu_kmod_el9.ko'],
        },
      },
      { regexp: '.', containerImage: 'quay.io/acme/gpu-signed:$KERNEL_FULL_VERSION' },
    ],
    {
      sign: {
        unsignedImage: 'quay.io/acme/gpu-unsigned:default',
        keySecret: { name: 'key' },
        certSecret: { name: 'cert' },
        unsignedImageRegistryTLS: { insecureSkipTLSVerify: true },
        filesToSign: ['/opt/lib/modules/$KERNEL_FULL_VERSION/gpu_kmod.ko'],
      },
    },
  );
  const kernel = '5.14.0-284.30.1.el9_2.x86_64';
  const s = mapped(resolveModuleForKernel(m, kernel)).sign;
  t.same(s, {
    unsignedImage: 'quay.io/acme/gpu-unsigned:5.14.0-',
    unsignedImageRegistryTLS: { insecure: false, insecureSkipTLSVerify: true },
    keySecret: 'el9-key',
    certSecret: 'el9-cert',
    filesToSign: [`/opt/lib/modules/${kernel}/gpu_kmod.ko`, `/opt/lib/modules/${kernel}/gpu_kmod_el9.ko`],
  }, "KMM substitutes only the kernel variables in sign fields (MOD_NAME is empty there) and keeps the Module's unsignedImageRegistryTLS");
  const d = mapped(resolveModuleForKernel(m, '6.1.0-13-amd64')).sign;
  t.same(d, {
    unsignedImage: 'quay.io/acme/gpu-unsigned:default',
    unsignedImageRegistryTLS: { insecure: false, insecureSkipTLSVerify: true },
    keySecret: 'key',
    certSecret: 'cert',
    filesToSign: ['/opt/lib/modules/6.1.0-13-amd64/gpu_kmod.ko'],
  }, "a mapping without sign gets the Module's");
});

t.test('every template variable, in $VAR and ${VAR} forms', async (t) => {
  const kernel = '6.1.0-13-amd64';
  const names = ['KERNEL_FULL_VERSION', 'KERNEL_VERSION', 'KERNEL_XYZ', 'KERNEL_X', 'KERNEL_Y', 'KERNEL_Z', 'MOD_NAME', 'MOD_NAMESPACE'];
  const values = [kernel, kernel, '6.1.0', '6', '1', '0', 'gpu-kmod', 'drivers'];
  const image = (tpl: string): string => mapped(resolveModuleForKernel(moduleWith([{ regexp: '.', containerImage: tpl }]), kernel)).containerImage;
  t.equal(image(`quay.io/acme/gpu:${names.map((n) => `\${${n}}`).join('_')}`), `quay.io/acme/gpu:${values.join('_')}`, '${VAR}');
  // `$KERNEL_X_` would read as the variable `KERNEL_X_`: the $VAR form needs a separator outside [A-Za-z0-9_].
  t.equal(image(`quay.io/acme/gpu:${names.map((n) => `$${n}`).join('-')}`), `quay.io/acme/gpu:${values.join('-')}`, '$VAR');
  const plus = mapped(resolveModuleForKernel(moduleWith([{ regexp: '.', containerImage: 'quay.io/acme/gpu:${KERNEL_FULL_VERSION}' }]), '5.14.0-284.el9.x86_64+rt'));
  t.equal(plus.containerImage, 'quay.io/acme/gpu:5.14.0-284.el9.x86_64_rt', 'templates see the normalised kernel, as KMM');
  const odd = mapped(resolveModuleForKernel(moduleWith([{ regexp: '.', containerImage: 'quay.io/acme/gpu:$KERNEL_X_$UNKNOWN${KERNEL_Y}x${NOPE:-dflt}$$KERNEL_Z' }]), kernel));
  t.equal(odd.containerImage, 'quay.io/acme/gpu:1xdflt$KERNEL_Z', 'greedy names, unknown is empty, ${X:-default}, $$ escapes');
  t.same(substituteTemplate('${KERNEL_X', new Map()), { ok: false, error: 'failed to substitute "${KERNEL_X": closing brace expected' });
  const broken = resolveModuleForKernel(moduleWith([{ regexp: '.', containerImage: 'quay.io/acme/gpu:${KERNEL_X' }]), kernel);
  t.equal(broken.kind, 'invalid');
  t.match(broken.kind === 'invalid' ? broken.reason : '', /kernelMappings\[0\]\.containerImage: failed to substitute .*closing brace expected/);
  const empty = resolveModuleForKernel(moduleWith([{ regexp: '.', containerImage: '$IMAGE' }]), kernel);
  t.match(empty.kind === 'invalid' ? empty.reason : '', /"\$IMAGE" is empty once its variables are substituted/);
});

t.test('kernelVersionParts splits on . , and -, like KMM', async (t) => {
  t.same(kernelVersionParts('6.1.0-13-amd64'), { full: '6.1.0-13-amd64', xyz: '6.1.0', x: '6', y: '1', z: '0' });
  t.same(kernelVersionParts('6.8-rc1'), { full: '6.8-rc1', xyz: '6.8.rc1', x: '6', y: '8', z: 'rc1' });
  t.same(kernelVersionParts('4,18,0'), { full: '4,18,0', xyz: '4.18.0', x: '4', y: '18', z: '0' });
  t.equal(kernelVersionParts('6.1'), undefined, 'fewer than three components');
  t.equal(normalizeKernelVersion('5.14.0+rt~1 x'), '5.14.0_rt_1_x');
  const r = resolveModuleForKernel(moduleWith([{ regexp: '.', containerImage: 'a/b:c' }]), '6.1');
  t.equal(r.kind, 'invalid');
  t.match(r.kind === 'invalid' ? r.reason : '', /kernel 6\.1 has fewer than three components/);
});

t.test('regexps Go (RE2) refuses make the Module invalid, with Go\'s reason', async (t) => {
  const cases: [string, RegExp][] = [
    ['(?=x)', /invalid or unsupported Perl syntax: `\(\?=`/],
    ['(?<!x)y', /invalid named capture: `\(\?<!x\)y`/], // Go reads (?< as a named group since 1.22
    ['(a)\\1', /invalid escape sequence: `\\1`/],
    ['a++', /invalid nested repetition operator: `\+\+`/],
    ['(?>a)', /invalid or unsupported Perl syntax: `\(\?>`/],
    ['6\\.1\\Z', /invalid escape sequence: `\\Z`/],
    ['\\C', /invalid escape sequence: `\\C`/],
    ['\\u0036', /invalid escape sequence: `\\u`/],
    ['a{1001}', /invalid repeat count: `\{1001\}`/],
  ];
  for (const [pattern, why] of cases) {
    const m = moduleWith([
      { literal: '6.1.0-13-amd64', containerImage: 'quay.io/acme/gpu:a' },
      { regexp: pattern, containerImage: 'quay.io/acme/gpu:b' },
    ]);
    const r = resolveModuleForKernel(m, '6.1.0-13-amd64');
    t.equal(r.kind, 'invalid', pattern);
    const reason = r.kind === 'invalid' ? r.reason : '';
    t.match(reason, why, pattern);
    t.match(reason, /^Module drivers\/gpu-kmod would be refused by KMM's admission webhook: spec\.moduleLoader\.container\.kernelMappings\[1\]\.regexp .* is not a valid Go \(RE2\) regular expression: error parsing regexp: /, pattern);
  }
});

t.test('Go-only regexp syntax is accepted and matches as Go would', async (t) => {
  const cases: [string, string, boolean][] = [
    ['^(?P<major>\\d+)\\.(?P<minor>\\d+)\\.', '6.1.0-13-amd64', true],
    ['(?i)AMD64$', '6.1.0-13-amd64', true],
    ['(?i:EL)9', '5.14.0-284.el9.x86_64', true],
    ['^[[:digit:]]+\\.[[:digit:]]+', '6.1.0-13-amd64', true],
    ['\\Q.el9_2.\\E', '5.14.0-284.30.1.el9_2.x86_64', true],
    ['\\Q.el9_2.\\E', '5.14.0-284.30.1xel9_2.x86_64', false],
    ['^\\pN+\\.', '6.1.0', true],
    ['(?U)^6.+?\\z', '6.1.0', true],
    ['(?<name>el)9', '5.14.0-284.el9.x86_64', true],
  ];
  for (const [pattern, kernel, matches] of cases) {
    const r = resolveModuleForKernel(moduleWith([{ regexp: pattern, containerImage: 'quay.io/acme/gpu:x' }]), kernel);
    t.equal(r.kind, matches ? 'mapping' : 'no-mapping', `${pattern} on ${kernel}`);
  }
});

t.test("KMM's other admission rules make the Module invalid", async (t) => {
  const both = moduleWith([{ literal: '6.1.0-1', regexp: '^6', containerImage: 'a/b:c' }]);
  t.same(validateModule(both), ['spec.moduleLoader.container.kernelMappings[0]: regexp and literal are mutually exclusive']);
  const neither = moduleWith([{ containerImage: 'a/b:c' }]);
  t.same(validateModule(neither), ['spec.moduleLoader.container.kernelMappings[0]: regexp or literal must be set']);
  const noImage = moduleWith([{ regexp: '.' }]);
  const r = resolveModuleForKernel(noImage, '6.1.0-1');
  t.equal(r.kind, 'invalid');
  t.match(r.kind === 'invalid' ? r.reason : '', /kernelMappings\[0\]\.containerImage: missing, and spec\.moduleLoader\.container\.containerImage is not set either/);
  const order = load(manifest({ kernelMappings: [{ regexp: '.', containerImage: 'a/b:c' }], modprobe: { moduleName: 'a', modulesLoadingOrder: ['b', 'a'] } }));
  t.same(validateModule(order), ['spec.moduleLoader.container.modprobe.modulesLoadingOrder: if a loading order is defined, the first element must be moduleName']);
  const raw = load(manifest({ kernelMappings: [{ regexp: '.', containerImage: 'a/b:c' }], modprobe: { rawArgs: { load: ['-d', '/opt', 'a'], unload: ['-r', 'a'] } } }));
  t.same(validateModule(raw), []);
  t.equal(resolveModuleForKernel(raw, '6.1.0-1').kind, 'nothing-to-validate', 'rawArgs: no module name to look for');
});

t.test('in-tree modules to remove: mapping list, container list, legacy single field', async (t) => {
  const m = moduleWith(
    [
      { literal: '6.1.0-1', containerImage: 'a/b:1', inTreeModulesToRemove: ['nouveau'] },
      { literal: '6.1.0-2', containerImage: 'a/b:2', inTreeModulesToRemove: [] },
      { literal: '6.1.0-3', containerImage: 'a/b:3', inTreeModuleToRemove: 'legacy_map' },
      { literal: '6.1.0-4', containerImage: 'a/b:4' },
    ],
    { inTreeModulesToRemove: ['drm_a', 'drm_b'] },
  );
  t.same(mapped(resolveModuleForKernel(m, '6.1.0-1')).inTreeModulesToRemove, ['nouveau']);
  t.same(mapped(resolveModuleForKernel(m, '6.1.0-2')).inTreeModulesToRemove, [], 'an empty list in the mapping still replaces');
  t.same(mapped(resolveModuleForKernel(m, '6.1.0-3')).inTreeModulesToRemove, ['legacy_map']);
  t.same(mapped(resolveModuleForKernel(m, '6.1.0-4')).inTreeModulesToRemove, ['drm_a', 'drm_b']);
});

t.test('parseModule lists every bad shape with its field path', async (t) => {
  const r = parseModule({
    apiVersion: 'kmm.sigs.x-k8s.io/v1',
    kind: 'Module',
    metadata: { name: '', generation: '3' },
    spec: {
      selector: { 'kubernetes.io/arch': 42 },
      imageRepoSecret: 'pull-secret',
      moduleLoader: {
        container: {
          modprobe: { moduleName: 7, parameters: 'a=1' },
          imagePullPolicy: 'always',
          registryTLS: { insecure: 'yes' },
          kernelMappings: [
            { literal: '6.1.0-13-amd64', containerImage: ['x'] },
            'regexp',
            { regexp: '^6', build: { buildArgs: [{ name: 'A' }] }, sign: { filesToSign: [1] } },
          ],
        },
      },
    },
  });
  t.equal(r.ok, false);
  t.same(r.ok ? [] : [...r.errors].sort(), [
    'apiVersion: must be kmm.sigs.x-k8s.io/v1beta1, got "kmm.sigs.x-k8s.io/v1"',
    'metadata.name: must not be empty',
    'spec.selector["kubernetes.io/arch"]: must be a string, got a number',
    'spec.imageRepoSecret: must be an object, got a string',
    'spec.moduleLoader.container.modprobe.moduleName: must be a string, got a number',
    'spec.moduleLoader.container.modprobe.parameters: must be an array, got a string',
    'spec.moduleLoader.container.kernelMappings[0].containerImage: must be a string, got an array',
    'spec.moduleLoader.container.kernelMappings[1]: must be an object, got a string',
    'spec.moduleLoader.container.kernelMappings[2].build.dockerfileConfigMap: required',
    'spec.moduleLoader.container.kernelMappings[2].build.buildArgs[0].value: required',
    'spec.moduleLoader.container.kernelMappings[2].sign.keySecret: required',
    'spec.moduleLoader.container.kernelMappings[2].sign.certSecret: required',
    'spec.moduleLoader.container.kernelMappings[2].sign.filesToSign[0]: must be a string, got a number',
    'spec.moduleLoader.container.imagePullPolicy: must be one of Always, Never, IfNotPresent, got "always"',
    'spec.moduleLoader.container.registryTLS.insecure: must be a boolean, got a string',
    'metadata.generation: must be an integer, got a string',
  ].sort(), 'every error, with its path');
  t.same(parseModule('kind: Module'), { ok: false, errors: ['(root): must be an object, got a string'] });
  t.same(parseModule({ metadata: { name: 'x' }, spec: { moduleLoader: { container: { modprobe: {}, kernelMappings: [] } } } }), {
    ok: false,
    errors: ['spec.selector: required', 'spec.moduleLoader.container.kernelMappings: must have at least one item'],
  });
});

t.test('parseModule: nulls are absent, unknown fields ignored, metadata kept', async (t) => {
  const m = load({
    ...manifest({
      kernelMappings: [{ regexp: '.', literal: '', containerImage: 'a/b:c', build: null, sign: null, registryTLS: null, inTreeModulesToRemove: null }],
      build: null,
      version: '',
      somethingNew: { x: 1 },
    }),
    status: { moduleLoader: {} },
  });
  t.same(m.metadata, { name: 'gpu-kmod', namespace: 'drivers', generation: 3, resourceVersion: '812', uid: 'b6c1e1a4-5a0e-4a8e-9d43-0f6f3c9b7a11' });
  t.equal(moduleKey(m), 'drivers/gpu-kmod');
  t.same(m.spec.moduleLoader?.container.kernelMappings[0], { regexp: '.', literal: '', containerImage: 'a/b:c' });
  const noNs = parseModule({ metadata: { name: 'x' }, spec: { selector: {} } }, { defaultNamespace: 'default' });
  t.equal(noNs.ok && moduleKey(noNs.module), 'default/x');
});

// Written raw (regexps keep their backslashes); `@{` stands for `${`, which a template literal would interpolate.
const KMM_DOCS_MODULE = String.raw`
apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata:
  name: my-kmod
  namespace: kmm-demo
spec:
  moduleLoader:
    container:
      modprobe:
        moduleName: my-kmod  # Required
        dirName: /opt  # Optional
        firmwarePath: /firmware
        parameters:  # Optional
          - param=1
        modulesLoadingOrder:  # optional
          - my-kmod
          - my_dep_a
          - my_dep_b
      imagePullPolicy: Always  # optional
      inTreeModulesToRemove: [my-intree-kmod, my-other-intree-kmod] # optional
      kernelMappings:  # At least one item is required
        - literal: 6.0.15-300.fc37.x86_64
          containerImage: some.registry/org/my-kmod:6.0.15-300.fc37.x86_64

        # For each node running a kernel matching the regexp below,
        # KMM will create a DaemonSet running the image specified in containerImage
        # with @{KERNEL_FULL_VERSION} replaced with the kernel version.
        - regexp: '^.+\fc37\.x86_64$'
          containerImage: "some.other.registry/org/my-kmod:@{KERNEL_FULL_VERSION}"

        - regexp: '^.+\.el9_\d+\.x86_64$'
          containerImage: "some.registry/org/@{MOD_NAMESPACE}-@{MOD_NAME}:@{KERNEL_XYZ}-el9"
          registryTLS:
            insecureSkipTLSVerify: true

        # For any other kernel, build the image using the Dockerfile in the my-kmod ConfigMap.
        - regexp: '^.+$'
          containerImage: "some.registry/org/my-kmod:@{KERNEL_FULL_VERSION}"
          inTreeModulesToRemove: [my-intree-kmod]
          build:
            buildArgs:  # Optional
              - name: ARG_NAME
                value: some-value
            secrets:  # Optional
              - name: some-kubernetes-secret
            baseImageRegistryTLS:
              insecure: false
              insecureSkipTLSVerify: false
            dockerfileConfigMap:  # Required
              name: my-kmod-dockerfile
          sign:
            certSecret:
              name: cert-secret  # Required
            keySecret:
              name: key-secret  # Required
            filesToSign:
              - /opt/lib/modules/@{KERNEL_FULL_VERSION}/my-kmod.ko
          registryTLS:
            insecure: false
            insecureSkipTLSVerify: false
  devicePlugin:  # Optional
    container:
      image: some.registry/org/device-plugin:latest
  imageRepoSecret:  # Optional. Used to pull kmod and device plugin images
    name: secret-name
  selector:
    node-role.kubernetes.io/worker: ""
`.replaceAll('@{', '${');

t.test("a Module in the style of KMM's documentation, read from YAML and resolved", async (t) => {
  const parsed = parseModule(parseYaml(KMM_DOCS_MODULE));
  t.ok(parsed.ok, parsed.ok ? 'parsed' : parsed.errors.join('; '));
  if (!parsed.ok) return;
  const m = parsed.module;
  t.same(validateModule(m), []);

  const fc37 = mapped(resolveModuleForKernel(m, '6.0.15-300.fc37.x86_64'));
  t.same(fc37.matchedBy, { literal: '6.0.15-300.fc37.x86_64' });
  t.same(fc37, {
    moduleName: 'my-kmod',
    dirName: '/opt',
    containerImage: 'some.registry/org/my-kmod:6.0.15-300.fc37.x86_64',
    registryTLS: { insecure: false, insecureSkipTLSVerify: false },
    inTreeModulesToRemove: ['my-intree-kmod', 'my-other-intree-kmod'],
    imageRepoSecret: 'secret-name',
    matchedBy: { literal: '6.0.15-300.fc37.x86_64' },
  });

  // The documentation's '^.+\fc37...' has \f, a form feed in RE2 as in Go: it never matches a
  // real kernel, so other fc37 kernels fall through to the build mapping, as in KMM.
  const other = mapped(resolveModuleForKernel(m, '6.0.18-300.fc37.x86_64'));
  t.same(other.matchedBy, { regexp: '^.+$' });
  t.equal(other.containerImage, 'some.registry/org/my-kmod:6.0.18-300.fc37.x86_64');
  t.same(other.inTreeModulesToRemove, ['my-intree-kmod']);
  t.same(other.build, {
    buildArgs: [
      { name: 'ARG_NAME', value: 'some-value' },
      { name: 'KERNEL_FULL_VERSION', value: '6.0.18-300.fc37.x86_64' },
      { name: 'KERNEL_VERSION', value: '6.0.18-300.fc37.x86_64' },
      { name: 'MOD_NAME', value: 'my-kmod' },
      { name: 'MOD_NAMESPACE', value: 'kmm-demo' },
    ],
    dockerfileConfigMap: 'my-kmod-dockerfile',
    secrets: ['some-kubernetes-secret'],
    baseImageRegistryTLS: { insecure: false, insecureSkipTLSVerify: false },
  });
  t.same(other.sign, {
    unsignedImageRegistryTLS: { insecure: false, insecureSkipTLSVerify: false },
    keySecret: 'key-secret',
    certSecret: 'cert-secret',
    filesToSign: ['/opt/lib/modules/6.0.18-300.fc37.x86_64/my-kmod.ko'],
  });

  const el9 = mapped(resolveModuleForKernel(m, '5.14.0-284.30.1.el9_2.x86_64'));
  t.same(el9.matchedBy, { regexp: '^.+\\.el9_\\d+\\.x86_64$' });
  t.equal(el9.containerImage, 'some.registry/org/kmm-demo-my-kmod:5.14.0-el9');
  t.same(el9.registryTLS, { insecure: false, insecureSkipTLSVerify: true });
  t.equal(el9.build, undefined);

  const r = resolveModuleForKernel(m, '');
  t.equal(r.kind, 'no-mapping', 'an empty kernel matches nothing, not even ^.+$');
  t.match(r.kind === 'no-mapping' ? r.reason : '', /Module kmm-demo\/my-kmod matches kernel  \(mappings: literal "6\.0\.15-300\.fc37\.x86_64", regexp/);
});

t.test('regexps are compiled once per Module object', async (t) => {
  const m = moduleWith(Array.from({ length: 50 }, (_, i) => ({ regexp: `^${i}\\.(?:[0-9]+\\.){2}.*-custom$`, containerImage: `quay.io/acme/gpu:${i}` })));
  const start = performance.now();
  let found = 0;
  for (let k = 0; k < 2000; k++) if (resolveModuleForKernel(m, `${k % 60}.1.2.3-custom`).kind === 'mapping') found++;
  t.equal(found, 33 * 50 + 20, 'kernels 0.x to 49.x match, 50.x to 59.x do not');
  t.ok(performance.now() - start < 5000, 'two thousand resolutions against fifty regexps stay fast');
  t.equal(validateModule(m), validateModule(m), 'the compiled form is cached on the Module object');
});
