"""Real nginx in front of a real php-fpm (FastCGI over TCP), both on free loopback ports in a
temporary directory, both stopped by PID.

Scripts: ``index.php`` (echoes method, query and body size), ``error.php`` (sets status 500),
``stderr.php`` (writes to stderr via error_log), ``big.php`` (a 300 KB response); a missing
script gives php-fpm's own 404 ("File not found.").
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.capture import free_port, wait_port
from tests.support.proc import stop

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PHP_FPM = (sorted(glob.glob("/usr/sbin/php-fpm*")) or ["/usr/sbin/php-fpm"])[-1]

_SCRIPTS = {
    "index.php": "<?php header('X-App: wirespan'); $b = file_get_contents('php://input');"
                 " echo $_SERVER['REQUEST_METHOD'], ' ', $_SERVER['QUERY_STRING'], ' ', strlen($b), \"\\n\";",
    "error.php": "<?php http_response_code(500); echo 'boom';",
    "stderr.php": "<?php error_log('something odd happened'); echo 'ok';",
    "big.php": "<?php echo str_repeat('x', 300000);",
}


@dataclass
class FastCgiSite:
    http_port: int
    fpm_port: int
    root: str


@contextlib.contextmanager
def nginx_php_fpm() -> Iterator[FastCgiSite]:
    d = tempfile.mkdtemp(prefix="wirespan-fcgi-")
    os.chmod(d, 0o755)
    root = os.path.join(d, "www")
    os.mkdir(root)
    for name, code in _SCRIPTS.items():
        with open(os.path.join(root, name), "w") as f:
            f.write(code)
    http_port, fpm_port = free_port(), free_port()
    fpm_conf = os.path.join(d, "php-fpm.conf")
    with open(fpm_conf, "w") as f:
        f.write(f"""[global]
pid = {d}/php-fpm.pid
error_log = {d}/php-fpm.log
daemonize = no
[www]
user = root
group = root
listen = 127.0.0.1:{fpm_port}
pm = static
pm.max_children = 2
catch_workers_output = yes
php_admin_flag[log_errors] = on
""")
    nginx_conf = os.path.join(d, "nginx.conf")
    with open(nginx_conf, "w") as f:
        f.write(f"""daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    fastcgi_temp_path {d}/fastcgi;
    proxy_temp_path {d}/proxy;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 20m;
    server {{
        listen 127.0.0.1:{http_port};
        root {root};
        location ~ \\.php$ {{
            fastcgi_pass 127.0.0.1:{fpm_port};
            fastcgi_keep_conn on;
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
        }}
    }}
}}
""")
    fpm = subprocess.Popen([PHP_FPM, "-F", "-R", "-y", fpm_conf], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    ngx = None
    try:
        wait_port(fpm_port)
        ngx = subprocess.Popen([NGINX, "-c", nginx_conf, "-p", d], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        wait_port(http_port)
        yield FastCgiSite(http_port, fpm_port, root)
    finally:
        stop(ngx)
        stop(fpm)
        shutil.rmtree(d, ignore_errors=True)
