//! token-meter: counts the tokens of every LLM request, streams included.
//!
//! This crate is the shell: it compiles the configuration once per VM and
//! gives each request a [`MeterStage`] run by the shared host adapter. All
//! metering logic is in `aigw_shared::meter`.

use aigw_shared::host::{self, Idle, StageHttp};
use aigw_shared::meter::{Meter, MeterStage};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    host::init();
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(TokenMeterRoot { meter: None }) });
}}

struct TokenMeterRoot {
    meter: Option<Rc<Meter>>,
}

impl Context for TokenMeterRoot {}

impl RootContext for TokenMeterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        match Meter::from_json(&config) {
            Ok(meter) => {
                self.meter = Some(Rc::new(meter));
                true
            }
            Err(e) => {
                host::log(
                    LogLevel::Error,
                    &format!("token-meter: invalid configuration: {e}"),
                );
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Envoy creates no stream before a configuration loads; if it ever
        // did, passing the request through beats trapping the VM.
        Some(match &self.meter {
            Some(meter) => Box::new(StageHttp::new(MeterStage::new(Rc::clone(meter)))),
            None => Box::new(Idle),
        })
    }
}
